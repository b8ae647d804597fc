"""How far a quantized engine strays from the unquantized one on the same weights.

The unquantized engine answers a fixed set of chat prompts (sampled, seeded): that text is what
both engines then score, teacher-forced through `prompt_logprobs`. Printed: top-1 agreement (the
two engines' most likely next token is the same), each engine's perplexity on the text, the mean
absolute difference of the text's token logprobs, and how many greedy answers come out identical.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from typing import Any

from lmserve.engine.args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

QUESTIONS = (
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about the sea.",
    "Give three tips for learning a new language.",
    "What causes the seasons on Earth?",
    "Write a Python function that reverses a string.",
    "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "List five fruits that are rich in vitamin C.",
    "How does a bicycle stay upright?",
    "What is the difference between weather and climate?",
    "Describe a healthy breakfast.",
    "What is machine learning?",
    "Write a short thank-you note to a teacher.",
    "How do vaccines work?",
    "Name the planets of the solar system in order.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_engine_cli_args(parser)
    parser.set_defaults(quantization="int8")
    parser.add_argument("--max-tokens", type=int, default=128, help="answer length scored")


def main(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = engine_kwargs_from_cli(args)
    candidate = kwargs["quantization"]
    reference_llm = LLM(args.model, **{**kwargs, "quantization": None})
    messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sampled = reference_llm.chat(
        messages,
        [
            SamplingParams(temperature=0.8, max_tokens=args.max_tokens, seed=args.seed + i)
            for i in range(len(messages))
        ],
        use_tqdm=False,
    )
    texts = [out.prompt_token_ids + out.outputs[0].token_ids for out in sampled]
    starts = [len(out.prompt_token_ids) for out in sampled]
    reference = _score(reference_llm, texts, starts, messages, args.max_tokens)
    del reference_llm
    gc.collect()
    quantized = _score(LLM(args.model, **kwargs), texts, starts, messages, args.max_tokens)
    result = _compare(reference, quantized)
    result.update(quantization=candidate, num_texts=len(texts), max_tokens=args.max_tokens)
    print(json.dumps(result), flush=True)
    return result


def _score(
    llm: LLM,
    texts: list[list[int]],
    starts: list[int],
    messages: list[list[dict[str, str]]],
    max_tokens: int,
) -> dict[str, Any]:
    """Per answer token: (the text token's logprob, the engine's top-1 token); greedy answers."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": t} for t in texts], params, use_tqdm=False)
    positions = [_positions(out, start) for out, start in zip(outputs, starts, strict=True)]
    greedy = llm.chat(
        messages, SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False
    )
    return {"positions": positions, "greedy": [g.outputs[0].token_ids for g in greedy]}


def _positions(out: RequestOutput, start: int) -> list[tuple[float, int]]:
    assert out.prompt_logprobs is not None
    scored = []
    for token, entry in zip(out.prompt_token_ids[start:], out.prompt_logprobs[start:], strict=True):
        assert entry is not None
        top1 = next(tid for tid, lp in entry.items() if lp.rank == 1)
        scored.append((entry[token].logprob, top1))
    return scored


def _compare(reference: dict[str, Any], quantized: dict[str, Any]) -> dict[str, Any]:
    ref = [p for text in reference["positions"] for p in text]
    qua = [p for text in quantized["positions"] for p in text]
    agree = sum(r[1] == q[1] for r, q in zip(ref, qua, strict=True))
    same_greedy = sum(a == b for a, b in zip(reference["greedy"], quantized["greedy"], strict=True))
    return {
        "num_tokens": len(ref),
        "top1_agreement": round(agree / len(ref), 4),
        "perplexity_reference": round(math.exp(-sum(r[0] for r in ref) / len(ref)), 4),
        "perplexity_quantized": round(math.exp(-sum(q[0] for q in qua) / len(qua)), 4),
        "mean_abs_logprob_diff": round(
            sum(abs(r[0] - q[0]) for r, q in zip(ref, qua, strict=True)) / len(ref), 4
        ),
        "identical_greedy_answers": f"{same_greedy}/{len(reference['greedy'])}",
    }
