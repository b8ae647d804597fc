"""Pixtral's vision tower (Pixtral-12B's image encoder, under LLaVA): images at their own
resolution in, one hidden state per 16-pixel patch out.

Patch embedding by a strided convolution (no bias), an RMSNorm before the layers, and pre-norm
layers with 2D rotary attention (a patch's row angle on half the frequencies, its column angle
on the other half) and a gated MLP: HF's PixtralVisionModel in fp32. A batch holds images of one
size, so each image attends to itself alone without a block mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.activation import activation
from lmserve.models.weights import copy_named

_EPS = 1e-5  # HF's Pixtral norms use this, whatever the config says


class PixtralAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [images, patches, hidden]; cos/sin: [patches, head_dim]."""
        batch, patches, _ = x.shape
        q, k, v = (
            proj(x).view(batch, patches, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.o_proj(out)


class PixtralLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, inner = cfg["hidden_size"], cfg["intermediate_size"]
        self.attention_norm = nn.RMSNorm(hidden, eps=_EPS)
        self.attention = PixtralAttention(hidden, cfg["num_attention_heads"])
        self.ffn_norm = nn.RMSNorm(hidden, eps=_EPS)
        self.feed_forward = nn.Module()
        self.feed_forward.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.feed_forward.up_proj = nn.Linear(hidden, inner, bias=False)
        self.feed_forward.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act = activation(cfg.get("hidden_act", "gelu"))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        ff = self.feed_forward
        h = self.ffn_norm(x)
        return x + ff.down_proj(self.act(ff.gate_proj(h)) * ff.up_proj(h))


class PixtralVisionTower(nn.Module):
    """HF's PixtralVisionModel, by its parameter names."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        self.patch_size = cfg["patch_size"]
        self.image_size = cfg["image_size"]
        self.patch_conv = nn.Conv2d(
            cfg.get("num_channels", 3), hidden, self.patch_size, self.patch_size, bias=False
        )
        self.ln_pre = nn.RMSNorm(hidden, eps=_EPS)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            PixtralLayer(cfg) for _ in range(cfg["num_hidden_layers"])
        )
        head_dim = cfg.get("head_dim") or hidden // heads
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta") or cfg.get("rope_theta", 1e4)
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        # rows turn with the even-indexed frequencies, columns with the odd ones
        self.register_buffer("row_freq", inv_freq[0::2].clone(), persistent=False)
        self.register_buffer("col_freq", inv_freq[1::2].clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """[images, channels, height, width] (one size, multiples of the patch) ->
        [images, patches, hidden], patches row by row: the hidden states after layer
        `feature_layer` (0: the normed patch embeddings, -1: the last layer)."""
        height, width = (side // self.patch_size for side in pixel_values.shape[-2:])
        patches = self.patch_conv(pixel_values).flatten(2).transpose(1, 2)
        x = self.ln_pre(patches)
        cos, sin = self._angles(height, width, x.dtype)
        layers = self.transformer.layers
        for layer in layers[: feature_layer % (len(layers) + 1)]:
            x = layer(x, cos, sin)
        return x

    def _angles(self, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        device = self.row_freq.device
        rows = torch.arange(height, device=device).repeat_interleave(width)
        cols = torch.arange(width, device=device).repeat(height)
        half = torch.cat(
            [rows[:, None] * self.row_freq, cols[:, None] * self.col_freq], dim=-1
        )  # [patches, head_dim / 2]
        angles = torch.cat([half, half], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return copy_named(self, weights)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half layout: x * cos + rotate_half(x) * sin."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin
