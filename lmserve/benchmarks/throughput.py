"""Offline throughput, like vLLM's benchmark_throughput.py: one `LLM.generate` over a fixed batch.

Every request is sampled (temperature 1) with EOS ignored, so it yields exactly its output length.
`--peer hf` then runs the same prompts through HF transformers' `generate` in the same process.
`--images N` gives each prompt N random images (a vision-language model), and reports the
image encoder's own time over them apart.
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
from lmserve.benchmarks.shapes import resolve_model, shape_names
from lmserve.config import EngineConfig, ModelConfig
from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli
from lmserve.engine.llm import LLM
from lmserve.models.gguf import ensure_hf_weights, gguf_source
from lmserve.models.loader import torch_dtype
from lmserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]  # with images: their placeholder rows first
    output_lens: list[int]
    images: list[list[Any]] | None = None  # PIL images of each prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help=f"{MODEL_HELP}; or a shipped shape with --load-format dummy: "
        + ", ".join(shape_names()),
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
        "--images",
        type=int,
        default=0,
        help="random images per prompt (a vision-language model), each a distinct image ahead "
        "of the prompt's --input-len text tokens",
    )
    parser.add_argument(
        "--image-size", type=int, default=336, help="side of the random square images, in pixels"
    )
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
    warmup = _random_prompts(
        rng, 2, args.input_len if args.dataset is None else len(workload.prompts[0]), vocab_size
    )
    warm = Workload(warmup, [4] * len(warmup))
    if workload.images is not None:  # warm-up images of their own: none is cached for the run
        workload = _with_images(workload, config, args.images, args.image_size, rng)
        warm = _with_images(warm, config, args.images, args.image_size, rng)
    results = {
        "lmserve": _report(
            "lmserve", config, workload, *_time_lmserve(llm, workload, _lmserve_prompts(warm))
        )
    }
    if workload.images is not None:
        results["lmserve"]["image_encoder_s"] = _time_image_encoder(llm, workload)
    if args.roofline and workload.images is None:  # (its model covers the language model)
        results["lmserve"]["roofline"] = _roofline(config, workload, results["lmserve"])
    print(json.dumps(results["lmserve"]), flush=True)
    if args.peer == "hf":
        del llm  # free its weights and KV cache before HF loads its own copy
        gc.collect()
        if config.device.startswith("cuda"):
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)
        timing = _time_hf(config, workload, warm, args.peer_batch_size)
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
        images = [[] for _ in prompts] if args.images else None
        return Workload(prompts, [args.output_len] * args.num_prompts, images)
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


def _with_images(
    workload: Workload, config: EngineConfig, per_prompt: int, size: int, rng: np.random.Generator
) -> Workload:
    """Each prompt with `per_prompt` distinct random images, their placeholders (as many as
    the model's processor makes of each) ahead of its text tokens: token ids, so any tokenizer
    works, a shape's placeholder one too."""
    from PIL import Image

    if "vision_config" not in config.model.hf_config:
        raise ValueError(f"--images needs a vision-language model, not {config.model.model}")
    layout = _image_layout(config)
    images = [
        [
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(per_prompt)
        ]
        for _ in workload.prompts
    ]
    prompts = [
        [token for image in row for token in layout(image)] + prompt
        for prompt, row in zip(workload.prompts, images, strict=True)
    ]
    return Workload(prompts, workload.output_lens, images)


def _image_layout(config: EngineConfig) -> Any:
    """image -> the token ids that stand for it in a prompt, as the model's processor lays
    them out (LLaVA-1.5: one placeholder per row; Qwen2.5-VL: a pad per merged block between
    its vision start and end tokens)."""
    from transformers import AutoImageProcessor

    hf = config.model.hf_config
    vision = hf["vision_config"]
    placeholder = int(hf.get("image_token_id", hf.get("image_token_index")))
    if vision.get("model_type") == "pixtral":
        raise ValueError("--images does not lay out Pixtral prompts yet; use a LLaVA-1.5 or "
                         "Qwen2.5-VL model")  # fmt: skip
    if "vision_start_token_id" in hf:  # Qwen2.5-VL
        processor = AutoImageProcessor.from_pretrained(config.model.path)
        merge = vision.get("spatial_merge_size", 2)
        start, end = int(hf["vision_start_token_id"]), int(hf["vision_end_token_id"])

        def qwen(image: Any) -> list[int]:
            grid = processor([image], return_tensors="np")["image_grid_thw"][0]
            return [start] + [placeholder] * (int(np.prod(grid)) // merge**2) + [end]

        return qwen
    rows = (vision["image_size"] // vision["patch_size"]) ** 2
    rows += hf.get("vision_feature_select_strategy", "default") == "full"
    return lambda image: [placeholder] * rows


def _lmserve_prompts(workload: Workload) -> list[dict[str, Any]]:
    if workload.images is None:
        return [{"prompt_token_ids": p} for p in workload.prompts]
    return [
        {"prompt_token_ids": p, "multi_modal_data": {"image": images}}
        for p, images in zip(workload.prompts, workload.images, strict=True)
    ]


def _time_image_encoder(llm: LLM, workload: Workload, batch_size: int = 8) -> float:
    """Seconds the model's image encoder takes over the workload's images on their own, as
    the engine gets them (prepared by the same processing, encoded in batches of one size):
    the share of the run that images cost."""
    from lmserve.multimodal.processing import ImagePrompts
    from lmserve.transfer import float32_tensor

    config = llm.config
    prepare = ImagePrompts(config.model, llm.get_tokenizer())
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for prompt in _lmserve_prompts(workload):
        for image in prepare(prompt, add_special_tokens=False)[1]:
            shape = tuple(image.shape)
            by_shape.setdefault(shape, []).append(float32_tensor(image.data, shape))
    model = llm.engine_core.runner.model
    device, dtype = torch.device(config.device), torch_dtype(config.model.dtype)
    batches = [
        torch.stack(group[i : i + batch_size]).to(device, dtype)
        for group in by_shape.values()
        for i in range(0, len(group), batch_size)
    ]
    with torch.inference_mode():
        model.embed_images(batches[0][:1])  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for batch in batches:
            model.embed_images(batch)
        _synchronize(device)
    return round(time.perf_counter() - start, 6)  # a tiny encoder takes well under a ms


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sampling_params(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=output_len)


def _time_lmserve(llm: LLM, workload: Workload, warmup: list[dict[str, Any]]) -> tuple[float, int]:
    """Seconds for one generate over the workload, and the output tokens it produced."""
    llm.generate(warmup, _sampling_params(4), use_tqdm=False)
    prompts = _lmserve_prompts(workload)
    params = [_sampling_params(n) for n in workload.output_lens]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(c.token_ids) for o in outputs for c in o.outputs)


def _time_hf(
    config: EngineConfig, workload: Workload, warmup: Workload, batch_size: int
) -> tuple[float, int]:
    """HF generate over the workload in batches, in lmserve's dtype; each batch runs to its longest
    output length, and a row counts only the tokens its request asked for."""
    import transformers

    model_config, device = config.model, config.device
    dtype = getattr(torch, model_config.dtype)
    auto = (
        transformers.AutoModelForCausalLM
        if workload.images is None
        else transformers.AutoModelForImageTextToText
    )
    if model_config.load_format == "dummy":
        hf_config = transformers.AutoConfig.from_pretrained(model_config.path)
        with torch.device(device):  # random init where the model runs: seconds, not minutes
            model = auto.from_config(hf_config, dtype=dtype)
    else:
        if gguf_source(model_config.path) is not None:
            ensure_hf_weights(model_config.path)
        model = auto.from_pretrained(model_config.path, dtype=dtype)
    model.to(device).eval()
    pad_token_id = _pad_token_id(model.generation_config)
    image_processor = (
        transformers.AutoImageProcessor.from_pretrained(model_config.path)
        if workload.images is not None
        else None
    )

    def generate(batch: Workload) -> int:
        prompts, output_lens = batch.prompts, batch.output_lens
        width, max_new = max(map(len, prompts)), max(output_lens)
        input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        extra = {}
        if batch.images is not None and image_processor is not None:
            images = [image for row in batch.images for image in row]
            extra = {
                k: v.to(device) for k, v in image_processor(images, return_tensors="pt").items()
            }
            extra["pixel_values"] = extra["pixel_values"].to(dtype)
            if "image_grid_thw" in extra:  # Qwen2.5-VL places image tokens by their type
                image_id = model.config.image_token_id
                extra["mm_token_type_ids"] = (input_ids == image_id).int().to(device)
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
            **extra,
        )
        return sum(min(out.shape[1] - width, n) for n in output_lens)

    def part(w: Workload, i: int) -> Workload:
        images = w.images[i : i + batch_size] if w.images is not None else None
        return Workload(w.prompts[i : i + batch_size], w.output_lens[i : i + batch_size], images)

    with torch.inference_mode():
        generate(warmup)
        start = time.perf_counter()
        num_output_tokens = sum(
            generate(part(workload, i)) for i in range(0, len(workload.prompts), batch_size)
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return elapsed, num_output_tokens


def _bytes_per_weight(model: ModelConfig, element: int) -> float:
    """What a step reads per weight: int8's byte, int4's Q4_1 blocks (20 bytes per 32), a
    GGUF's blocks as stored (the file's average over its weights), else the dtype's size."""
    from lmserve.models.memory import weight_bytes

    if model.quantization == "int8":
        return 1.0
    if model.quantization == "int4":
        return 20 / 32
    stored = weight_bytes(model) if model.quantization in ("gguf", "gguf_q8") else None
    if stored:
        return stored / ModelCost.from_config(model, 1.0, element).weight_bytes
    return float(element)


def _roofline(config: EngineConfig, workload: Workload, record: dict[str, Any]) -> dict[str, Any]:
    dtype = torch_dtype(config.model.dtype)
    element = torch.empty((), dtype=dtype).element_size()
    int8 = config.model.quantization == "int8"
    cost = ModelCost.from_config(config.model, _bytes_per_weight(config.model, element), element)
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
    record: dict[str, Any] = {
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
    if workload.images is not None:
        record["images_per_prompt"] = len(workload.images[0])
        record["image_size"] = workload.images[0][0].size[0]
    return record


if __name__ == "__main__":
    run()
