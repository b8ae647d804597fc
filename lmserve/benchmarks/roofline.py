"""What the hardware allows a throughput workload, and the fraction a run achieved.

Each step's lower bound is max(bytes it must read / memory bandwidth, FLOPs / peak rate), both
measured on the device at hand (a large copy, a large GEMM in the model's compute type). Prefill
counts as compute; a decode step reads the weights once plus every running request's KV cache.
Requests run in waves of max_num_seqs, as the scheduler admits them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lmserve.config import ModelConfig


@dataclass(frozen=True)
class Hardware:
    bandwidth_gb_s: float  # bytes read + written per second by a large copy
    peak_tops: float  # tera-ops/s of a large square GEMM in the compute type (int8 or float)


@dataclass(frozen=True)
class ModelCost:
    weight_bytes: float  # read once per step: the linear layers and the LM head
    flops_per_token: float  # 2 x those parameters
    kv_bytes_per_token: float  # K and V of every layer
    attn_flops_per_key: float  # per query token and key it attends: QK^T and PV, every layer

    @classmethod
    def from_config(cls, model: ModelConfig, weight_bytes: float, kv_bytes: float) -> ModelCost:
        cfg = model.hf_config
        hidden, layers = int(cfg["hidden_size"]), model.num_layers
        q_size, kv_size = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        per_layer = hidden * (q_size + 2 * kv_size) + q_size * hidden
        per_layer += 3 * hidden * int(cfg["intermediate_size"])
        params = layers * per_layer + model.vocab_size * hidden
        return cls(
            weight_bytes=params * weight_bytes,
            flops_per_token=2.0 * params,
            kv_bytes_per_token=2.0 * layers * kv_size * kv_bytes,
            attn_flops_per_key=4.0 * layers * q_size,
        )


def measure_hardware(device: torch.device, dtype: torch.dtype, int8: bool = False) -> Hardware:
    cuda = device.type == "cuda"
    src = torch.empty((256 if cuda else 128) << 18, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    copy_s = _best_time(lambda: dst.copy_(src), device)
    n = 8192 if cuda else 1024
    if int8:
        a = torch.randint(-8, 8, (n, n), dtype=torch.int8, device=device)
        gemm_s = _best_time(lambda: torch._int_mm(a, a), device)
    else:
        b = torch.randn(n, n, device=device).to(dtype)
        gemm_s = _best_time(lambda: b @ b, device)
    return Hardware(2 * src.nbytes / copy_s / 1e9, 2 * n**3 / gemm_s / 1e12)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def roofline_seconds(
    cost: ModelCost,
    hw: Hardware,
    prompt_lens: list[int],
    output_lens: list[int],
    max_num_seqs: int,
) -> float:
    """Lower bound on the workload's time: prefill FLOPs, then each decode step's bound (the
    first output token of a request comes with its prefill)."""
    bandwidth, peak = hw.bandwidth_gb_s * 1e9, hw.peak_tops * 1e12
    prompts, outputs = np.asarray(prompt_lens, float), np.asarray(output_lens)
    prefill = prompts * cost.flops_per_token + cost.attn_flops_per_key * prompts * (prompts + 1) / 2
    seconds = float(prefill.sum()) / peak
    for start in range(0, len(prompts), max_num_seqs):
        wave_prompts, wave_outputs = (
            prompts[start : start + max_num_seqs],
            outputs[start : start + max_num_seqs],
        )
        for step in range(1, int(wave_outputs.max())):
            live = wave_outputs > step
            context = float((wave_prompts[live] + step).sum())
            read = cost.weight_bytes + context * cost.kv_bytes_per_token
            flops = int(live.sum()) * cost.flops_per_token + context * cost.attn_flops_per_key
            seconds += max(read / bandwidth, flops / peak)
    return seconds
