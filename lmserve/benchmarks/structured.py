"""Structured-output overhead: JSON-schema-constrained decoding vs the same requests unconstrained.

The constrained run goes first; the unconstrained run then asks each request for exactly as many
tokens as its constrained twin produced (EOS ignored), so both runs compute the same tokens over
the same prompts and the ratio isolates the grammar's cost. Grammar compile time and the mask
fill per token are measured on the same schema, with each backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.sampling_params import SamplingParams, StructuredOutputsParams
from lmserve.structured_output.backend import backend_class
from lmserve.structured_output.spec import GrammarSpec

# A typical API schema: nested objects, an array, enums, bounded numbers, a $ref.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        }
    },
    "properties": {
        "name": {"type": "string", "maxLength": 32},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"$ref": "#/$defs/address"},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["name", "age", "role", "address", "skills"],
}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help=MODEL_HELP)
    add_engine_cli_args(parser)
    parser.set_defaults(max_num_seqs=64)
    parser.add_argument("--num-prompts", type=int, default=64, help="requests in the batch")
    parser.add_argument("--max-tokens", type=int, default=256, help="cap on each output")
    parser.add_argument(
        "--schema", default=None, help="JSON schema file (default: a typical nested schema)"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    schema = json.loads(Path(args.schema).read_text()) if args.schema else SCHEMA
    llm = LLM(args.model, **engine_kwargs_from_cli(args))
    prompts = [
        [{"role": "user", "content": f"Invent user number {i} of a website, as JSON."}]
        for i in range(args.num_prompts)
    ]
    constrained = [
        SamplingParams(
            temperature=1.0,
            seed=i,
            max_tokens=args.max_tokens,
            structured_outputs=StructuredOutputsParams(json=schema),
        )
        for i in range(args.num_prompts)
    ]
    llm.chat(prompts[:2], constrained[:2], use_tqdm=False)  # warm up, and compile the grammar
    start = time.perf_counter()
    outputs = llm.chat(prompts, constrained, use_tqdm=False)
    constrained_s = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    valid = sum(_is_json(o.outputs[0].text) for o in outputs)
    free = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=n, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    start = time.perf_counter()
    llm.chat(prompts, free, use_tqdm=False)
    free_s = time.perf_counter() - start
    num_tokens = sum(lengths)
    result = {
        "bench": "structured",
        "model": llm.config.model.model,
        "backend": llm.config.structured_output.backend,
        "num_prompts": args.num_prompts,
        "num_output_tokens": num_tokens,
        "valid_json": valid,
        "constrained_tok_per_s": round(num_tokens / constrained_s, 2),
        "unconstrained_tok_per_s": round(num_tokens / free_s, 2),
        "ratio": round(free_s / constrained_s, 3),
        "torch_threads": torch.get_num_threads(),
        "device": llm.config.device,
        **_grammar_costs(llm, schema, outputs[0].outputs[0].token_ids),
    }
    print(json.dumps(result), flush=True)
    return result


def _grammar_costs(llm: LLM, schema: dict[str, Any], token_ids: list[int]) -> dict[str, float]:
    """Per backend: compile time of the schema (fresh compiler, no cache) and the median and mean
    time to fill one token's mask while replaying a constrained output (the mean carries the
    slow states a median hides)."""
    spec = GrammarSpec.from_params(StructuredOutputsParams(json=schema))
    vocab_size = llm.config.model.vocab_size
    costs: dict[str, float] = {}
    for name in ("xgrammar", "guidance"):
        backend = backend_class(name)(llm.get_tokenizer(), vocab_size)
        start = time.perf_counter()
        matcher = backend.matcher(backend.compile(spec))
        costs[f"{name}_compile_ms"] = round((time.perf_counter() - start) * 1e3, 2)
        bitmask = torch.empty(1, -(-vocab_size // 32), dtype=torch.int32)
        fills = []
        for token_id in token_ids:
            start = time.perf_counter()
            matcher.fill_bitmask(bitmask, 0)
            fills.append(time.perf_counter() - start)
            if not matcher.accept(token_id):
                break
        costs[f"{name}_mask_us_median"] = round(statistics.median(fills) * 1e6, 1)
        costs[f"{name}_mask_us_mean"] = round(statistics.mean(fills) * 1e6, 1)
    return costs


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True
