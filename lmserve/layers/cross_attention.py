"""Cross-attention over encoder states kept in KV blocks (Whisper's decoder reading its audio).

An encoder-decoder request holds extra blocks from the KV manager for its encoder states' K/V,
in each decoder layer's own cache. Only this module reads or writes them, so it lays them out
for itself: a request's keys (and values) are one [heads, blocks * block_size, head_dim] array
cut into its blocks in order, whatever layout the attention backend gives its own blocks. When
the blocks are consecutive (the usual case: they are taken in one go) attention reads them in
place; otherwise they are gathered first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CrossBlocks:
    """Where one request's encoder K/V live: its blocks, and their span if consecutive."""

    block_ids: torch.Tensor  # [num_blocks] int64
    span: tuple[int, int] | None  # [lo, hi) when block_ids are lo, lo + 1, ..., hi - 1
    num_states: int  # encoder states (keys) in them

    @classmethod
    def of(cls, block_ids: list[int], num_states: int, device: torch.device) -> CrossBlocks:
        lo = block_ids[0]
        consecutive = block_ids == list(range(lo, lo + len(block_ids)))
        return cls(
            torch.tensor(block_ids, dtype=torch.long, device=device),
            (lo, lo + len(block_ids)) if consecutive else None,
            num_states,
        )


@dataclass(frozen=True)
class CrossLayout:
    """One step's rows: each row's query tokens [start, end) and the blocks it attends to."""

    rows: list[tuple[int, int, CrossBlocks]]


def store_cross(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: CrossBlocks
) -> None:
    """Write one request's encoder K/V ([states, heads, head_dim] each) into its blocks."""
    num_blocks, num_states = len(blocks.block_ids), k.shape[0]
    heads, head_dim = k.shape[1:]
    per_block = kv_cache[0, 0].numel()
    capacity = num_blocks * per_block // (heads * head_dim)
    for i, states in enumerate((k, v)):
        laid = states.new_zeros(heads, capacity, head_dim)
        laid[:, :num_states] = states.transpose(0, 1)
        kv_cache[i].view(kv_cache.shape[1], per_block)[blocks.block_ids] = laid.view(
            num_blocks, per_block
        )


def read_cross(
    kv_cache: torch.Tensor, blocks: CrossBlocks, heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's encoder K and V as [heads, states, head_dim] (views when consecutive)."""
    per_block = kv_cache[0, 0].numel()
    out = []
    for i in range(2):
        flat = kv_cache[i].view(kv_cache.shape[1], per_block)
        if blocks.span is not None:
            held = flat[blocks.span[0] : blocks.span[1]]
        else:
            held = flat[blocks.block_ids]
        out.append(held.view(heads, -1, head_dim)[:, : blocks.num_states])
    return out[0], out[1]


def cross_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layout: CrossLayout, scale: float
) -> torch.Tensor:
    """q: [num_tokens, heads, head_dim] -> [num_tokens, heads, head_dim]; every query sees all
    of its request's encoder states (no mask)."""
    heads, head_dim = q.shape[1:]
    out = torch.empty_like(q)
    for start, end, blocks in layout.rows:
        k, v = read_cross(kv_cache, blocks, heads, head_dim)
        rows = q[start:end].transpose(0, 1)  # [heads, queries, head_dim]
        out[start:end] = F.scaled_dot_product_attention(rows, k, v, scale=scale).transpose(0, 1)
    return out
