"""Offline throughput, like vLLM's benchmark_throughput.py: one `LLM.generate` over a fixed batch.

Every request is sampled (temperature 1) with EOS ignored, so it yields exactly its output length.
`--peer hf` then runs the same prompts through HF transformers' `generate` in the same process.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.benchmarks.roofline import ModelCost, measure_hardware, roofline_seconds
from lmserve.benchmarks.shapes import resolve_model
from lmserve.config import EngineConfig
from lmserve.engine.args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.models.loader import torch_dtype
from lmserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"{MODEL_HELP}; or a shipped shape, Llama-3-8B or Qwen2.5-0.5B, with "
        "--load-format dummy",
    )
    add_engine_cli_args(parser)
    parser.set_defaults(max_num_seqs=64)
    parser.add_argument("--num-prompts", type=int, default=64, help="requests in the batch")
    parser.add_argument("--input-len", type=int, default=128, help="random prompt tokens each")
    parser.add_argument("--output-len", type=int, default=128, help="tokens generated each")
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help='JSONL of {"prompt": str} or {"prompt_token_ids": [...]}, optional "output_len"; '
        "overrides --input-len",
    )
    parser.add_argument(
        "--peer",
        choices=["none", "hf"],
        default="none",
        help="hf: also run HF transformers generate on the same prompts, and print the ratio",
    )
    parser.add_argument("--peer-batch-size", type=int, default=8, help="prompts per HF generate")
    parser.add_argument(
        "--roofline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure this device's copy bandwidth and GEMM rate, and report the "
        "workload's roofline bound and the fraction of it achieved",
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Time lmserve (and the peer); print one JSON line per engine, plus the ratio with a peer."""
    llm = LLM(resolve_model(args.model), **engine_kwargs_from_cli(args))
    config, vocab_size = llm.config, llm.config.model.vocab_size
    rng = np.random.default_rng(args.seed)
    workload = _load_workload(args, vocab_size, llm.get_tokenizer(), rng)
    warmup = _random_prompts(rng, 2, len(workload.prompts[0]), vocab_size)
    results = {
        "lmserve": _report("lmserve", config, workload, *_time_lmserve(llm, workload, warmup))
    }
    if args.roofline:
        results["lmserve"]["roofline"] = _roofline(config, workload, results["lmserve"])
    print(json.dumps(results["lmserve"]), flush=True)
    if args.peer == "hf":
        del llm  # free its weights and KV cache before HF loads its own copy
        gc.collect()
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)
        timing = _time_hf(config, workload, warmup, args.peer_batch_size)
        results["hf"] = _report("hf", config, workload, *timing)
        ratio = results["lmserve"]["output_tok_per_s"] / results["hf"]["output_tok_per_s"]
        results["ratio_output_tok_per_s"] = round(ratio, 3)
        print(json.dumps(results["hf"]), flush=True)
        print(json.dumps({"ratio_output_tok_per_s": results["ratio_output_tok_per_s"]}), flush=True)
    return results


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


def _random_prompts(
    rng: np.random.Generator, num_prompts: int, input_len: int, vocab_size: int
) -> list[list[int]]:
    """Token ids clear of the low and high ids where special tokens usually live."""
    return rng.integers(100, vocab_size - 100, size=(num_prompts, input_len)).tolist()


def _load_workload(
    args: argparse.Namespace, vocab_size: int, tokenizer: Any, rng: np.random.Generator
) -> Workload:
    if args.dataset is None:
        prompts = _random_prompts(rng, args.num_prompts, args.input_len, vocab_size)
        return Workload(prompts, [args.output_len] * args.num_prompts)
    lines = [ln for ln in args.dataset.read_text().splitlines() if ln.strip()]
    prompts, output_lens = [], []
    for line in lines[: args.num_prompts]:
        entry = json.loads(line)
        if "prompt_token_ids" in entry:
            prompts.append([int(t) for t in entry["prompt_token_ids"]])
        elif tokenizer is None:
            raise ValueError(f"the model has no tokenizer; {args.dataset} needs prompt_token_ids")
        else:
            prompts.append(list(tokenizer.encode(entry["prompt"])))
        output_lens.append(int(entry.get("output_len", args.output_len)))
    if not prompts:
        raise ValueError(f"{args.dataset} has no prompts")
    return Workload(prompts, output_lens)


def _sampling_params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)


def _time_lmserve(llm: LLM, workload: Workload, warmup: list[list[int]]) -> tuple[float, int]:
    """Seconds for one generate over the workload, and the output tokens it produced."""
    llm.generate([{"prompt_token_ids": p} for p in warmup], _sampling_params(4), use_tqdm=False)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    params = [_sampling_params(n) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _time_hf(
    config: EngineConfig, workload: Workload, warmup: list[list[int]], batch_size: int
) -> tuple[float, int]:
    """HF generate over the workload in batches, in lmserve's dtype; each batch runs to its longest
    output length, and a row counts only the tokens its request asked for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config, device = config.model, config.device
    dtype = getattr(torch, model_config.dtype)
    if model_config.load_format == "dummy":
        hf_config = AutoConfig.from_pretrained(model_config.path)
        with torch.device(device):  # random init where the model runs: seconds, not minutes
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_config.path, dtype=dtype)
    model.to(device).eval()
    pad_token_id = _pad_token_id(model.generation_config)

    def generate(prompts: list[list[int]], output_lens: list[int]) -> int:
        width, max_new = max(map(len, prompts)), max(output_lens)
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=pad_token_id,
        )
        return sum(min(out.shape[1] - width, n) for n in output_lens)

    with torch.inference_mode():
        generate(warmup, [4] * len(warmup))
        start = time.perf_counter()
        num_output_tokens = sum(
            generate(workload.prompts[i : i + batch_size], workload.output_lens[i : i + batch_size])
            for i in range(0, len(workload.prompts), batch_size)
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, num_output_tokens


def _roofline(config: EngineConfig, workload: Workload, record: dict[str, Any]) -> dict[str, Any]:
    dtype = torch_dtype(config.model.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    int8 = config.model.quantization == "int8"
    cost = ModelCost.from_config(config.model, 1 if int8 else element, element)
    hardware = measure_hardware(torch.device(config.device), dtype, int8)
    seconds = roofline_seconds(
        cost,
        hardware,
        [len(p) for p in workload.prompts],
        workload.output_lens,
        config.scheduler.max_num_seqs,
    )
    bound = record["num_output_tokens"] / seconds
    values = {
        "bandwidth_gb_s": hardware.bandwidth_gb_s,
        "peak_tops": hardware.peak_tops,
        "seconds": seconds,
        "output_tok_per_s": bound,
        "fraction": record["output_tok_per_s"] / bound,
    }
    return {name: float(f"{value:.4g}") for name, value in values.items()}


def _pad_token_id(generation_config: Any) -> int:
    token_id = generation_config.pad_token_id
    if token_id is None:
        token_id = generation_config.eos_token_id
    if isinstance(token_id, list):
        token_id = token_id[0] if token_id else None
    return 0 if token_id is None else int(token_id)


def _report(
    engine: str, config: EngineConfig, workload: Workload, elapsed: float, num_output_tokens: int
) -> dict[str, Any]:
    """One run's JSON record; peak_rss_mb is the process's peak so far (the peer runs after us)."""
    num_prompts = len(workload.prompts)
    num_prompt_tokens = sum(map(len, workload.prompts))
    return {
        "engine": engine,
        "model": config.model.model,
        "num_prompts": num_prompts,
        "input_len": round(num_prompt_tokens / num_prompts),
        "output_len": round(sum(workload.output_lens) / num_prompts),
        "num_prompt_tokens": num_prompt_tokens,
        "num_output_tokens": num_output_tokens,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(num_prompts / elapsed, 3),
        "output_tok_per_s": round(num_output_tokens / elapsed, 2),
        "total_tok_per_s": round((num_prompt_tokens + num_output_tokens) / elapsed, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "device": config.device,
    }


if __name__ == "__main__":
    run()
