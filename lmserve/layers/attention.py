"""The attention layer: stores this step's K/V into its paged cache, then attends through the
backend chosen for the device, with metadata from the forward context. Under the pooling
runner's PackedLayout it attends within each whole prompt and keeps no K/V.

`sliding_window` (a query sees its last that many keys, itself included), `soft_cap` (Gemma 2's
tanh cap on scores) and `sinks` (gpt-oss's learned logit per head, in the softmax's denominator
with no value) are the layer's own: models interleave windowed and global layers."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.forward_context import get_attn_metadata
from lmserve.layers.direct_call import DirectCall
from lmserve.layers.packed_attention import PackedLayout, packed_attention


class Attention(DirectCall, nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        sliding_window: int | None = None,
        soft_cap: float | None = None,
        sinks: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        # loaded as `<layer>.sinks`: one logit per query head
        self.sinks = nn.Parameter(torch.zeros(num_heads), requires_grad=False) if sinks else None
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; bound by the worker after profiling
        self.kv_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        metadata = get_attn_metadata()
        if isinstance(metadata, PackedLayout):  # the pooling runner: whole prompts, no cache
            if self.soft_cap is not None or self.sinks is not None:
                raise NotImplementedError("attention soft-capping or sinks in the pooling runner")
            return packed_attention(
                q, k, v, metadata, self.scale, causal=True, window=self.sliding_window
            )
        if self.kv_cache is None:
            raise RuntimeError("attention layer has no KV cache bound")
        return metadata.backend.forward(
            q,
            k,
            v,
            self.kv_cache,
            metadata,
            self.scale,
            window=self.sliding_window,
            soft_cap=self.soft_cap,
            sinks=self.sinks,
        )
