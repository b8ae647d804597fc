"""Qwen2.5-VL's vision tower: an image at its own resolution (a grid of 14-pixel patches, two
frames deep) in, one row per 2x2 block of patches out, in the language model's width.

The patches come from HF's Qwen2-VL image processor already grouped by 2x2 merge block. A 3D
convolution embeds them; each layer is pre-RMSNorm attention with 2D rotary angles (a patch's
row on the first half of the frequencies, its column on the second) and a gated MLP. Most
layers attend within windows of `window_size` pixels (the tokens are reordered window by window
for them), the `fullatt_block_indexes` layers across the whole image; the merger then norms,
joins each 2x2 block and projects it. HF's Qwen2_5_VisionTransformerPretrainedModel in fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.activation import activation
from lmserve.models.weights import copy_named

_EPS = 1e-6


class VisionAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        """x: [tokens, hidden]; attention within each [bounds[i], bounds[i+1]) stretch."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, tokens, head_dim]
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b])
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ],
            dim=1,
        )
        return self.proj(out.transpose(0, 1).reshape(x.shape))


class VisionBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
        self.norm1 = nn.RMSNorm(hidden, eps=_EPS)
        self.norm2 = nn.RMSNorm(hidden, eps=_EPS)
        self.attn = VisionAttention(hidden, cfg.get("num_heads") or cfg["num_attention_heads"])
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(hidden, inner)
        self.mlp.up_proj = nn.Linear(hidden, inner)
        self.mlp.down_proj = nn.Linear(inner, hidden)
        self.act = activation(cfg.get("hidden_act", "silu"))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        h, mlp = self.norm2(x), self.mlp
        return x + mlp.down_proj(self.act(mlp.gate_proj(h)) * mlp.up_proj(h))


class Qwen2_5_VisionTower(nn.Module):
    """HF's Qwen2.5-VL vision model, by its parameter names (`patch_embed`, `blocks`,
    `merger`)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.patch = cfg.get("patch_size", 14)
        self.frames = cfg.get("temporal_patch_size", 2)
        self.channels = cfg.get("in_channels", 3)
        self.merge = cfg.get("spatial_merge_size", 2)
        self.window = cfg.get("window_size", 112) // self.merge // self.patch  # in merged units
        self.full_layers = set(cfg.get("fullatt_block_indexes", ()))
        kernel = (self.frames, self.patch, self.patch)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv3d(
            self.channels, hidden, kernel_size=kernel, stride=kernel, bias=False
        )
        depth = cfg.get("depth") or cfg["num_hidden_layers"]
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(depth))
        merged = hidden * self.merge**2
        self.merger = nn.Module()
        self.merger.ln_q = nn.RMSNorm(hidden, eps=_EPS)
        self.merger.mlp = nn.Sequential(
            nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg["out_hidden_size"])
        )
        heads = cfg.get("num_heads") or cfg["num_attention_heads"]
        quarter = hidden // heads // 2
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float) / quarter))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[images, frames, height, width, patch values] (one grid; the patches in the image
        processor's merge-block order) -> [images, frames * height * width / merge², out]."""
        return torch.stack([self._image(p) for p in patches])

    def _image(self, patches: torch.Tensor) -> torch.Tensor:
        t, h, w, _ = patches.shape
        x = self.patch_embed.proj(
            patches.reshape(-1, self.channels, self.frames, self.patch, self.patch)
        ).view(t * h * w, -1)
        order, windows = self._windows(t, h, w)
        unit = self.merge**2
        x = x.view(-1, unit, x.shape[-1])[order].view(x.shape)
        angles = self._angles(h, w).repeat(t, 1)
        angles = angles.view(-1, unit, angles.shape[-1])[order].view(angles.shape)
        cos, sin = angles.cos(), angles.sin()
        per_frame = list(range(0, t * h * w + 1, h * w))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, per_frame if i in self.full_layers else windows)
        merger = self.merger
        merged = merger.mlp(merger.ln_q(x).view(-1, unit * x.shape[-1]))
        return merged[torch.argsort(order)]

    def _angles(self, h: int, w: int) -> torch.Tensor:
        """[h * w, head_dim] rotary angles, patches in merge-block order."""
        m, device = self.merge, self.inv_freq.device
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        rows, cols = (
            grid.reshape(h // m, m, w // m, m).transpose(1, 2).flatten() for grid in (rows, cols)
        )
        half = torch.cat([rows[:, None] * self.inv_freq, cols[:, None] * self.inv_freq], dim=-1)
        return torch.cat([half, half], dim=-1)

    def _windows(self, t: int, h: int, w: int) -> tuple[torch.Tensor, list[int]]:
        """The merge blocks reordered window by window (each frame's windows in raster order,
        each window's blocks in raster order), and the token bounds of the windows."""
        gh, gw, size = h // self.merge, w // self.merge, self.window
        order, bounds = [], [0]
        for frame in range(t):
            for top in range(0, gh, size):
                for left in range(0, gw, size):
                    rows = torch.arange(top, min(top + size, gh))
                    cols = torch.arange(left, min(left + size, gw))
                    order.append((frame * gh * gw + rows[:, None] * gw + cols).flatten())
                    bounds.append(bounds[-1] + len(order[-1]) * self.merge**2)
        return torch.cat(order).to(self.inv_freq.device), bounds

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return copy_named(self, weights)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half layout) in fp32, as HF computes it; x: [tokens, heads, d]."""
    dtype = x.dtype
    x = x.float()
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return (x * cos + torch.cat([-second, first], dim=-1) * sin).to(dtype)
