"""How far a quantized engine strays from the unquantized one on the same weights.

The unquantized engine answers a fixed set of questions (sampled, seeded; as chats, or as
completions for a model without a chat template): that text is what both engines then score,
teacher-forced through `prompt_logprobs`. Printed: top-1 agreement (the two engines' most likely
next token is the same), each engine's perplexity on the text, the mean absolute difference of
the text's token logprobs, and how many greedy answers come out identical.

`--peer llama-perplexity` adds llama.cpp's own perplexity tool on the model's GGUF file, beside
both engines scored the same way on the same tokens: the answers' text as llama.cpp tokenizes it
(its tokenizer can split text unlike HF's: SmolLM2's "\n\n" is one token there, two in HF's),
cut into chunks of `--peer-context` tokens (the first made BOS where the vocabulary adds one),
each chunk's second half scored.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lmserve.benchmarks.serve import LLAMA_CPP_BIN
from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import SamplingParams

_LLAMA_PERPLEXITY = LLAMA_CPP_BIN / "llama-perplexity"

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
    parser.add_argument(
        "--peer",
        choices=["none", "llama-perplexity"],
        default="none",
        help="llama-perplexity: also run llama.cpp's perplexity tool on the model's .gguf file "
        "and report its number beside both engines' on the same chunks",
    )
    parser.add_argument(
        "--peer-binary",
        type=Path,
        default=_LLAMA_PERPLEXITY,
        help="the llama-perplexity executable (llama.cpp's; in its build directory: cmake "
        f"--build build --target llama-perplexity; default: {_LLAMA_PERPLEXITY})",
    )
    parser.add_argument(
        "--peer-context",
        type=int,
        default=128,
        help="tokens per perplexity chunk (llama-perplexity's -c); the second half is scored",
    )
    parser.add_argument(
        "--peer-threads", type=int, default=2, help="llama-perplexity's -t (CPU threads)"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = engine_kwargs_from_cli(args)
    # the oracle: float32, a .gguf model's weights dequantized
    reference_llm = LLM(args.model, **{**kwargs, "quantization": None, "dtype": "float32"})
    source = _peer_source(args, reference_llm)
    params = [
        SamplingParams(temperature=0.8, max_tokens=args.max_tokens, seed=args.seed + i)
        for i in range(len(QUESTIONS))
    ]
    sampled = _answer(reference_llm, params)
    texts = [out.prompt_token_ids + out.outputs[0].token_ids for out in sampled]
    starts = [len(out.prompt_token_ids) for out in sampled]
    plain = "\n\n".join(out.outputs[0].text for out in sampled)
    peer, chunks = _llama_perplexity(args, source, plain) if source else (None, [])
    chunks = _with_bos(reference_llm, chunks)
    reference = _score(reference_llm, texts, starts, args.max_tokens)
    reference_chunked = _chunked_perplexity(reference_llm, chunks)
    del reference_llm
    gc.collect()
    candidate = LLM(args.model, **kwargs)
    quantized = _score(candidate, texts, starts, args.max_tokens)
    result = _compare(reference, quantized)
    result.update(
        quantization=candidate.config.model.quantization,
        num_texts=len(texts),
        max_tokens=args.max_tokens,
    )
    if source is not None:
        result["chunked_perplexity"] = {
            "context": args.peer_context,
            "chunks": len(chunks),
            "reference": reference_chunked,
            "quantized": _chunked_perplexity(candidate, chunks),
            "llama-perplexity": peer,
        }
    print(json.dumps(result), flush=True)
    return result


def _peer_source(args: argparse.Namespace, llm: LLM) -> Path | None:
    """The .gguf file llama-perplexity reads, with `--peer llama-perplexity`; checked before
    any scoring."""
    if args.peer == "none":
        return None
    from lmserve.models.gguf import gguf_source

    source = gguf_source(llm.config.model.path)
    if source is None:
        raise SystemExit("--peer llama-perplexity needs a .gguf model (llama.cpp reads only those)")
    if not args.peer_binary.exists():
        raise SystemExit(
            f"no llama-perplexity at {args.peer_binary}: build it in llama.cpp's directory "
            "(cmake --build build --target llama-perplexity) and pass --peer-binary"
        )
    if args.peer_context < 4 or args.peer_context % 2:
        raise SystemExit(f"--peer-context must be even and at least 4, got {args.peer_context}")
    return source


def _with_bos(llm: LLM, chunks: list[list[int]]) -> list[list[int]]:
    """Each chunk's first token made BOS where the tokenizer adds one, as llama.cpp scores it."""
    tokenizer = llm.get_tokenizer()
    bos = tokenizer.bos_token_id
    if bos is None or tokenizer("a")["input_ids"][:1] != [bos]:
        return chunks
    return [[bos, *chunk[1:]] for chunk in chunks]


def _chunked_perplexity(llm: LLM, chunks: list[list[int]]) -> float | None:
    """Perplexity of each chunk's second half given all before it in the chunk (the token after
    the midpoint on), over all chunks: llama-perplexity's measure."""
    if not chunks:
        return None
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    nll, count = 0.0, 0
    for out in outputs:
        assert out.prompt_logprobs is not None
        first = len(out.prompt_token_ids) // 2
        for token, entry in zip(
            out.prompt_token_ids[first + 1 :], out.prompt_logprobs[first + 1 :], strict=True
        ):
            assert entry is not None
            nll -= entry[token].logprob
            count += 1
    return round(math.exp(nll / count), 4)


def _llama_perplexity(
    args: argparse.Namespace, source: Path, text: str
) -> tuple[float, list[list[int]]]:
    """llama.cpp's `Final estimate: PPL` on the text, file and chunk size, and the chunks of
    tokens it scored (read back from the logits file it writes with --kl-divergence-base:
    "_logits_", n_ctx, n_vocab, n_chunk, then the tokens, int32)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "text.txt").write_text(text)
        command = [
            str(args.peer_binary), "-m", str(source), "-f", str(Path(tmp) / "text.txt"),
            "-c", str(args.peer_context), "-b", str(args.peer_context),
            "-t", str(args.peer_threads), "-tb", str(args.peer_threads),
            "--kl-divergence-base", str(Path(tmp) / "base.bin"),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        found = re.search(r"Final estimate: PPL = ([\d.]+)", done.stdout + done.stderr)
        if done.returncode != 0 or found is None:
            tail = (done.stdout + done.stderr)[-2000:]
            raise SystemExit(
                f"llama-perplexity failed (status {done.returncode}); it needs at least two "
                f"chunks of --peer-context tokens (raise --max-tokens):\n{tail}"
            )
        with open(Path(tmp) / "base.bin", "rb") as file:
            magic, context = file.read(8), int(np.fromfile(file, np.int32, 1)[0])
            _, count = np.fromfile(file, np.int32, 2).tolist()
            tokens = np.fromfile(file, np.int32, count * context)
    assert magic == b"_logits_" and context == args.peer_context and len(tokens) == count * context
    return float(found.group(1)), tokens.reshape(count, context).tolist()


def _answer(llm: LLM, params: SamplingParams | list[SamplingParams]) -> list[RequestOutput]:
    """The answers to QUESTIONS: as chats, or for a model without a chat template (a base
    model, as Gemma-3-270m's GGUF) as "Question: ...\nAnswer:" completions."""
    if llm.get_tokenizer().chat_template:
        messages = [[{"role": "user", "content": q}] for q in QUESTIONS]
        return llm.chat(messages, params, use_tqdm=False)
    prompts = [f"Question: {q}\nAnswer:" for q in QUESTIONS]
    return llm.generate(prompts, params, use_tqdm=False)


def _score(llm: LLM, texts: list[list[int]], starts: list[int], max_tokens: int) -> dict[str, Any]:
    """Per answer token: (the text token's logprob, the engine's top-1 token); greedy answers."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": t} for t in texts], params, use_tqdm=False)
    positions = [_positions(out, start) for out, start in zip(outputs, starts, strict=True)]
    greedy = _answer(llm, SamplingParams(temperature=0, max_tokens=max_tokens))
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
