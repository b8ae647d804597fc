"""Rotary position embeddings (rotate-half layout, as HF Llama), with linear, Llama-3, YaRN and
LongRoPE frequency scaling, and Qwen2-VL's multimodal M-RoPE (three position components, each
turning its own bands)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lmserve.kernels import cpu_ops, cuda_ops


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies in fp32, as HF computes them, with `linear`, `llama3`, `yarn` or
    `longrope` scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = scaling_kind(scaling)
    if kind == "default":
        return inv_freq
    assert scaling is not None
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    if kind in LONGROPE_KINDS:
        # one set of factors for the engine's life: `long_context`, decided from max_model_len
        factors = scaling["long_factor" if scaling.get("long_context") else "short_factor"]
        return 1.0 / (torch.tensor(factors, dtype=torch.float32) * theta**exponents)
    raise ValueError(
        f"rope_scaling type {kind!r} is not supported (supported: linear, llama3, yarn, longrope)"
    )


LONGROPE_KINDS = ("longrope", "su")  # "su": Phi-3's first name for it


def rope_attention_factor(scaling: dict[str, Any] | None, max_position: int) -> float:
    """The factor HF multiplies cos and sin by: YaRN's attention scaling (its `attention_factor`,
    else 0.1 * ln(factor) + 1, or the ratio of two such terms with `mscale`/`mscale_all_dim`);
    LongRoPE's (its `attention_factor`, else sqrt(1 + ln(factor) / ln(original context)), the
    factor being the model's context over the original); 1 for every other kind."""
    kind = scaling_kind(scaling)
    if kind not in ("yarn", *LONGROPE_KINDS):
        return 1.0
    assert scaling is not None
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    if kind in LONGROPE_KINDS:
        original = float(scaling["original_max_position_embeddings"])
        factor = float(scaling.get("factor") or max_position / original)
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    factor = float(scaling["factor"])
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor, 1.0)


def scaling_kind(scaling: dict[str, Any] | None) -> str:
    """The config's RoPE scaling kind in either key (`rope_type`, older `type`); "default"."""
    return (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(
    inv_freq: torch.Tensor, dim: int, theta: float, scaling: dict[str, Any]
) -> torch.Tensor:
    """YaRN: high-frequency bands kept (extrapolated), low ones divided by `factor`
    (interpolated), a linear ramp between the bands that turn beta_fast and beta_slow times over
    the original context."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])

    def band(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = (
        band(float(scaling.get("beta_fast") or 32)),
        band(float(scaling.get("beta_slow") or 1)),
    )
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # HF's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolated) + inv_freq * extrapolated


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position. Computed once per forward pass and shared by all
    layers; the sign of rotate-half is folded into the sin table so applying it is three ops."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None,
        mrope_section: list[int] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        # M-RoPE (Qwen2-VL): frequency band i turns with position component i % 3 (t, h, w)
        bands = None
        if mrope_section:
            if sum(mrope_section) != head_dim // 2:
                raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2")
            half = torch.cat(
                [torch.full((n,), i % 3, dtype=torch.long) for i, n in enumerate(mrope_section)]
            )
            bands = torch.cat([half, half])
        self.register_buffer("mrope_bands", bands, persistent=False)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        factor = rope_attention_factor(scaling, max_position)
        cos, sin = freqs.cos() * factor, freqs.sin() * factor
        self.register_buffer("cos_cache", torch.cat((cos, cos), -1), persistent=False)
        # [-sin, sin]: x * cos + roll(x, half) * signed_sin == x * cos + rotate_half(x) * sin
        self.register_buffer("signed_sin_cache", torch.cat((-sin, sin), -1), persistent=False)

    def keep_positions(self, count: int) -> None:
        """Drop the tables' rows from `count` on: a model served with a shorter max_model_len
        never reads them (Gemma-3's 32k positions x 256 x 4 tables: 128 MB, half its Q4_K
        weights)."""
        if count < self.cos_cache.shape[0]:
            self.cos_cache = self.cos_cache[:count].clone()
            self.signed_sin_cache = self.signed_sin_cache[:count].clone()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(cos, signed_sin), each [num_tokens, 1, head_dim], to broadcast over heads.
        `positions` is [num_tokens], or [3, num_tokens] (t, h, w) for M-RoPE."""
        if positions.dim() == 2:
            return self._mrope(positions, dtype)
        cos = self.cos_cache.index_select(0, positions).unsqueeze(1).to(dtype)
        sin = self.signed_sin_cache.index_select(0, positions).unsqueeze(1).to(dtype)
        return cos, sin

    def _mrope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Each column of the tables read at the position component its band turns with."""
        assert self.mrope_bands is not None, "3D positions need an M-RoPE model"
        index = self.mrope_bands.expand(1, positions.shape[1], -1)
        out = []
        for table in (self.cos_cache, self.signed_sin_cache):
            rows = table[positions]  # [3, num_tokens, head_dim]
            out.append(rows.gather(0, index)[0].unsqueeze(1).to(dtype))
        return out[0], out[1]


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x: [num_tokens, heads, head_dim]; rope from RotaryEmbedding.forward. On CPU in float32
    (the same values, one pass instead of four ops) and on CUDA (one kernel) x is rotated in
    place and returned."""
    cos, signed_sin = rope
    if cpu_ops.usable(x):
        cpu_ops.rotary_(x, cos, signed_sin)
        return x
    if cuda_ops.usable(x):
        return cuda_ops.rotary_(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
