"""Attention over whole prompts packed back to back, with no KV cache: the pooling runner's.

Prompts are grouped into runs of similar length (the runner packs them longest first) and each
group is padded only to its own longest prompt for one batched SDPA call; a group of one needs
no padding and no mask. One padded call over a whole step of 8-128 word sentences wasted a
quarter of the time on padding (all-MiniLM-L6-v2, 1,000 sentences, 2 cores: 8.6 s vs 6.7 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# a group may hold up to this many padded slots per real token
_MAX_PADDING = 1.25


@dataclass(frozen=True)
class _Group:
    start: int  # first token of the group in the packed tensor
    end: int
    seq_lens: list[int]
    valid: torch.Tensor | None  # [B, L] real tokens; None for a group of one


class PackedLayout:
    """Where each packed prompt's tokens sit, grouped for attention."""

    def __init__(self, seq_lens: list[int], device: torch.device) -> None:
        self.seq_lens = seq_lens
        self.groups: list[_Group] = []
        start = 0
        for lens in _group(seq_lens):
            end = start + sum(lens)
            valid = None
            if len(lens) > 1:
                offsets = torch.arange(max(lens), device=device)
                valid = offsets[None, :] < torch.tensor(lens, device=device)[:, None]
            self.groups.append(_Group(start, end, lens, valid))
            start = end


def _group(seq_lens: list[int]) -> list[list[int]]:
    """Consecutive prompts, each group padded to its first (longest) one within the bound."""
    groups: list[list[int]] = []
    for n in seq_lens:
        if groups:
            current = groups[-1]
            longest = max(max(current), n)
            if longest * (len(current) + 1) <= _MAX_PADDING * (sum(current) + n):
                current.append(n)
                continue
        groups.append([n])
    return groups


def packed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PackedLayout,
    scale: float | None = None,
    causal: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, heads, D], k/v: [T, kv_heads, D] -> [T, heads, D], each prompt attending to
    itself only (bidirectionally, or causally for a decoder, over its last `window` keys if
    given)."""
    gqa = q.shape[1] != k.shape[1]
    outs = []
    for group in layout.groups:
        longest = max(group.seq_lens)
        windowed = causal and window is not None and longest > window
        if group.valid is None and not windowed:
            qg, kg, vg = (t[group.start : group.end].transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(
                qg, kg, vg, is_causal=causal, scale=scale, enable_gqa=gqa
            )
            outs.append(out[0].transpose(0, 1))
            continue
        valid = group.valid
        if valid is None:
            valid = torch.ones(1, longest, dtype=torch.bool, device=q.device)
        qg, kg, vg = (_pad(t[group.start : group.end], valid) for t in (q, k, v))
        mask = valid[:, None, None, :]  # [B, 1, 1, L]: padding keys masked out
        if causal:
            lower = torch.ones(longest, longest, dtype=torch.bool, device=q.device).tril_()
            if windowed:
                lower = lower.triu_(1 - window)
            mask = mask & lower
        out = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=mask, scale=scale, enable_gqa=gqa
        )
        outs.append(out.transpose(1, 2)[valid])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _pad(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[T, heads, D] packed -> [B, heads, L, D], zeros where a prompt is shorter."""
    batch, longest = valid.shape
    padded = x.new_zeros(batch, longest, *x.shape[1:])
    padded[valid] = x
    return padded.transpose(1, 2)
