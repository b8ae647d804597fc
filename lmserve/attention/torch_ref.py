"""Paged attention in plain torch: the CPU backend, and the oracle for every other backend.

The cache is head-major, [2, num_blocks, kv_heads, block_size, head_dim], so that one block of
one KV head is a contiguous [block_size, head_dim] matrix.

Decode rows (one query each) attend block by block: a batched matmul scores each block against
its row's queries, each block gets its own softmax, and blocks are merged per row by their
maxima and sums (flash-decoding's merge). When the step's blocks lie in a compact span of the
cache the matmuls read the cache in place, with no gather: at batch 64, context 192, SmolLM2,
that took a layer's decode attention from 2.6 to 1.6 ms here. Blocks off the span are gathered.

Prefill chunks (and a lone decode row) gather their blocks into [rows, kv_heads, keys, head_dim]
a cache-sized slice of rows at a time and go through SDPA, with a boolean mask for padding and
future positions. Padded block-table entries point at the null block, which stays zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.attention.backend import AttentionBackend, CommonAttentionMetadata

# K/V gathered per SDPA call: rows are attended in slices whose gathered blocks stay in cache
# between the gather and the read (at batch 64, context 192, SmolLM2: 2.8 -> 2.1-2.4 ms a layer).
_GATHER_BYTES = 2 << 20
# Decode blocks are read in place when the span holding them is at most this much larger than
# the blocks themselves (unused blocks in the span are read and masked out); else gathered.
_MAX_SPAN_RATIO = 1.5
# Added to the scores of keys a row must not see: finite, so a block with no visible key still
# has a finite maximum, and exp() of its difference to any real maximum is exactly zero.
_HIDDEN = -1e30


@dataclass(frozen=True)
class SdpaGroup:
    """Rows attended through SDPA: prefill chunks, or a lone decode row."""

    query_index: torch.Tensor  # [rows, max_q] token index of each padded query (pad: 0)
    block_table: torch.Tensor  # [rows * max_blocks] int64, flattened
    mask: torch.Tensor | None  # [rows, 1, max_q, num_keys] True = attend; None: see is_causal
    is_causal: bool  # no mask needed: one row whose keys are exactly its queries (or one query)
    num_keys: int  # keys attended per row (gathered blocks are cut to this)
    valid: torch.Tensor  # [rows, max_q] True where the query is real
    token_index: torch.Tensor  # [num_valid] token index of each real query, in valid order
    covers_batch: bool  # the group is the whole batch, unpadded: no gather/scatter of queries
    query_pos: torch.Tensor  # [rows, max_q] int64 position of each query (pad: 0)
    max_query_pos: int
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask_for(self, window: int | None) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for layers that see the last `window` keys (None: all keys); the
        window's masks are built once per step, at the first layer that asks."""
        if window is None or self.max_query_pos < window:  # no query is past its window
            return self.mask, self.is_causal
        mask = self._window_masks.get(window)
        if mask is None:
            k_pos = torch.arange(self.num_keys, device=self.query_pos.device)
            q_pos = self.query_pos[:, :, None]
            mask = ((k_pos <= q_pos) & (k_pos > q_pos - window))[:, None]  # pad rows: key 0
            self._window_masks[window] = mask
        return mask, False


@dataclass(frozen=True)
class _DecodeBlocks:
    """Decode rows attended block by block; `n` blocks, each scored against one row."""

    token_index: torch.Tensor  # [rows] the token (= query) of each decode row
    span: tuple[int, int] | None  # blocks [lo, hi) read in place; None: gathered by `blocks`
    blocks: torch.Tensor | None  # [n] int64 block ids to gather
    owner: torch.Tensor  # [n] int64 row each block belongs to (unused span blocks: row 0)
    mask: torch.Tensor  # [n, 1, 1, block_size] fp32: 0 for keys the row sees, else _HIDDEN
    covers_batch: bool  # every token of the step is a decode row, in row order
    first_key: torch.Tensor  # [n] int64 position of each block's first key (unused blocks: 0)
    seq_len: torch.Tensor  # [n] int64 keys of the block's row (unused blocks: 0)
    max_seq_len: int
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """`mask`, with keys before the row's last `window` hidden too (built once per step)."""
        if window is None or self.max_seq_len <= window:
            return self.mask
        mask = self._window_masks.get(window)
        if mask is None:
            key_pos = self.first_key[:, None] + torch.arange(
                self.mask.shape[-1], device=self.mask.device
            )
            early = key_pos < (self.seq_len - window)[:, None]
            mask = self.mask.masked_fill(early[:, None, None, :], _HIDDEN)
            self._window_masks[window] = mask
        return mask


@dataclass(frozen=True)
class TorchRefMetadata:
    backend: TorchRefBackend
    slot_block: torch.Tensor  # [num_tokens] int64 block each token's K/V is stored in
    slot_offset: torch.Tensor  # [num_tokens] int64 its offset in the block
    decode: _DecodeBlocks | None
    groups: tuple[SdpaGroup, ...]


class TorchRefBackend(AttentionBackend):
    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        return (2, num_blocks, num_kv_heads, block_size, head_dim)

    def build_metadata(self, common: CommonAttentionMetadata) -> TorchRefMetadata:
        is_decode = common.query_lens == 1
        decode_rows = np.flatnonzero(is_decode)
        decode = None
        groups = []
        if len(decode_rows) == 1:  # SDPA on the row's own keys beats the block merge
            groups.append(self._build_group(common, decode_rows))
        elif len(decode_rows):
            decode = self._build_decode(common, decode_rows)
        prefill_rows = np.flatnonzero(~is_decode)
        if len(prefill_rows):
            groups.append(self._build_group(common, prefill_rows))
        slots = common.slot_mapping
        block, offset = (
            slots.div(common.block_size, rounding_mode="floor"),
            slots % common.block_size,
        )
        return TorchRefMetadata(self, block, offset, decode, tuple(groups))

    def _build_decode(self, common: CommonAttentionMetadata, rows: np.ndarray) -> _DecodeBlocks:
        block_size = common.block_size
        seq_lens = common.seq_lens[rows]
        blocks_per_row = -(-seq_lens // block_size)
        row = np.repeat(np.arange(len(rows)), blocks_per_row)  # row of each (row, block) pair
        first = np.cumsum(blocks_per_row) - blocks_per_row
        col = np.arange(len(row)) - first[row]
        blocks = common.block_table[rows[row], col].astype(np.int64)
        visible = np.minimum(block_size, seq_lens[row] - col * block_size)
        lo, hi = int(blocks.min()), int(blocks.max()) + 1
        in_place = hi - lo <= _MAX_SPAN_RATIO * len(blocks) and len(np.unique(blocks)) == len(
            blocks
        )
        first_key, row_len = col * block_size, seq_lens[row]
        if in_place:
            owner = np.zeros(hi - lo, np.int64)
            owner[blocks - lo] = row
            span_visible = np.zeros(hi - lo, np.int64)  # unused blocks: nothing visible
            span_visible[blocks - lo] = visible
            span_first, span_len = np.zeros(hi - lo, np.int64), np.zeros(hi - lo, np.int64)
            span_first[blocks - lo], span_len[blocks - lo] = first_key, row_len
            row, visible, first_key, row_len = owner, span_visible, span_first, span_len
        mask = np.where(np.arange(block_size) < visible[:, None], 0.0, _HIDDEN)
        dev = self.device
        num_tokens = int(common.query_start_loc[-1])
        return _DecodeBlocks(
            token_index=torch.from_numpy(common.query_start_loc[rows].astype(np.int64)).to(dev),
            span=(lo, hi) if in_place else None,
            blocks=None if in_place else torch.from_numpy(blocks).to(dev),
            owner=torch.from_numpy(row).to(dev),
            mask=torch.from_numpy(mask.astype(np.float32)[:, None, None, :]).to(dev),
            covers_batch=len(rows) == num_tokens,
            first_key=torch.from_numpy(first_key.astype(np.int64)).to(dev),
            seq_len=torch.from_numpy(row_len.astype(np.int64)).to(dev),
            max_seq_len=int(seq_lens.max()),
        )

    def _build_group(self, common: CommonAttentionMetadata, rows: np.ndarray) -> SdpaGroup:
        starts = common.query_start_loc[rows]
        query_lens = common.query_lens[rows]
        seq_lens = common.seq_lens[rows]
        max_q = int(query_lens.max())
        num_blocks = -(-int(seq_lens.max()) // common.block_size)
        q_offsets = np.arange(max_q)
        valid = q_offsets[None, :] < query_lens[:, None]  # [rows, max_q]
        query_index = np.where(valid, starts[:, None] + q_offsets[None, :], 0)
        # Position of each query in its sequence; keys at positions <= it are visible.
        q_pos = (seq_lens - query_lens)[:, None] + q_offsets[None, :]
        k_pos = np.arange(num_blocks * common.block_size)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        mask[~valid] = False
        mask[~valid, 0] = True  # padded queries see one key, so softmax stays finite
        dev = self.device
        # A lone row needs no mask: cut its keys to its length; causal iff it has no context.
        lone = len(rows) == 1 and (max_q == 1 or int(seq_lens[0]) == max_q)
        num_tokens = int(common.query_start_loc[-1])
        return SdpaGroup(
            query_index=torch.from_numpy(query_index).to(dev),
            block_table=torch.from_numpy(
                common.block_table[rows, :num_blocks].astype(np.int64).reshape(-1)
            ).to(dev),
            mask=None if lone else torch.from_numpy(mask[:, None]).to(dev),
            is_causal=lone and max_q > 1,
            num_keys=int(seq_lens[0]) if lone else num_blocks * common.block_size,
            valid=torch.from_numpy(valid).to(dev),
            token_index=torch.from_numpy(query_index[valid]).to(dev),
            covers_batch=bool(valid.all()) and len(rows) * max_q == num_tokens,
            query_pos=torch.from_numpy(np.where(valid, q_pos, 0).astype(np.int64)).to(dev),
            max_query_pos=int(q_pos[valid].max()),
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchRefMetadata,
        scale: float,
        *,
        window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, kv_heads, block_size, d]
        key_cache[metadata.slot_block, :, metadata.slot_offset] = k
        value_cache[metadata.slot_block, :, metadata.slot_offset] = v
        decode = metadata.decode
        options = (window, soft_cap, sinks)
        if decode is not None:
            attn = _attend_decode(q, key_cache, value_cache, decode, scale, *options)
            if decode.covers_batch:
                return attn
            out = torch.empty_like(q)
            out[decode.token_index] = attn
        else:
            out = torch.empty_like(q)
        for group in metadata.groups:
            attn = attend_group(q, key_cache, value_cache, group, scale, *options)
            if group.covers_batch:
                return attn.reshape(q.shape)
            out[group.token_index] = attn[group.valid]
        return out


def _attend_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    decode: _DecodeBlocks,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, heads, d] attention of the decode rows, one softmax per block, merged per row
    (a sink is one more term of the merge: its logit, a zero value)."""
    if decode.span is not None:
        keys, values = key_cache[slice(*decode.span)], value_cache[slice(*decode.span)]
    else:
        keys = key_cache.index_select(0, decode.blocks)
        values = value_cache.index_select(0, decode.blocks)
    num_blocks, num_kv_heads, block_size, head_dim = keys.shape
    query = q if decode.covers_batch else q.index_select(0, decode.token_index)
    num_rows, num_heads = query.shape[:2]
    group = num_heads // num_kv_heads  # query heads h*group..h*group+group-1 read KV head h
    block_queries = query.index_select(0, decode.owner).view(-1, group, head_dim)
    scores = torch.bmm(block_queries, keys.view(-1, block_size, head_dim).transpose(1, 2))
    scores = scores.view(num_blocks, num_kv_heads, group, block_size).float().mul_(scale)
    if soft_cap is not None:
        scores = scores.div_(soft_cap).tanh_().mul_(soft_cap)
    scores = scores.add_(decode.mask_for(window))
    block_max = scores.amax(-1, keepdim=True)
    probs = scores.sub_(block_max).exp_()
    block_sum = probs.sum(-1).view(num_blocks, num_heads)
    block_out = torch.bmm(
        probs.view(-1, group, block_size).to(values.dtype), values.view(-1, block_size, head_dim)
    ).view(num_blocks, num_heads, head_dim)
    block_max = block_max.view(num_blocks, num_heads)
    row_max = torch.full((num_rows, num_heads), _HIDDEN, device=q.device).scatter_reduce_(
        0, decode.owner[:, None].expand(-1, num_heads), block_max, "amax"
    )
    if sinks is not None:
        row_max = torch.maximum(row_max, sinks.float())
    weight = block_max.sub_(row_max.index_select(0, decode.owner)).exp_()
    numerator = torch.zeros(num_rows, num_heads, head_dim, device=q.device).index_add_(
        0, decode.owner, block_out.float().mul_(weight[..., None])
    )
    if sinks is None:
        denominator = torch.zeros(num_rows, num_heads, device=q.device)
    else:
        denominator = (sinks.float() - row_max).exp_()
    denominator = denominator.index_add_(0, decode.owner, block_sum.mul_(weight))
    return numerator.div_(denominator[..., None]).to(q.dtype)


def attend_group(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: SdpaGroup,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """[rows, max_q, heads, d] SDPA over each row's gathered keys, a slice of rows at a time
    (written out where SDPA cannot: capped scores, sinks)."""
    rows = group.valid.shape[0]
    if group.covers_batch:
        query = q.view(rows, -1, *q.shape[1:])
    else:
        query = q.index_select(0, group.query_index.view(-1)).view(rows, -1, *q.shape[1:])
    attn = torch.empty_like(query)
    num_kv_heads, block_size, head_dim = key_cache.shape[1:]
    blocks_per_row = group.block_table.shape[0] // rows
    row_bytes = 2 * blocks_per_row * key_cache[0].nbytes
    step = max(1, _GATHER_BYTES // row_bytes)
    mask, is_causal = group.mask_for(window)
    plain = soft_cap is None and sinks is None
    attend = F.scaled_dot_product_attention if plain else _written_out(soft_cap, sinks)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        # index_select on the flattened table: far cheaper than advanced indexing on CPU
        table = group.block_table[start * blocks_per_row : end * blocks_per_row]
        keys, values = (
            cache.index_select(0, table)
            .view(end - start, blocks_per_row, num_kv_heads, block_size, head_dim)
            .transpose(1, 2)
            .reshape(end - start, num_kv_heads, -1, head_dim)[:, :, : group.num_keys]
            for cache in (key_cache, value_cache)
        )
        attn[start:end] = attend(
            query[start:end].transpose(1, 2),  # [rows, heads, max_q, d]
            keys,
            values,
            attn_mask=None if mask is None else mask[start:end],
            is_causal=is_causal,
            scale=scale,
            enable_gqa=True,
        ).transpose(1, 2)
    return attn


def _written_out(soft_cap: float | None, sinks: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """SDPA's signature, with what SDPA cannot do: scores capped by cap * tanh(s / cap), and a
    sink per head (a logit in the softmax's denominator with no value, gpt-oss's)."""

    def attend(
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        scale: float,
        enable_gqa: bool,
    ) -> torch.Tensor:
        group = query.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = (query @ keys.transpose(-1, -2)).float().mul_(scale)
        if soft_cap is not None:
            scores = scores.div_(soft_cap).tanh_().mul_(soft_cap)
        if is_causal:
            n_q, n_k = scores.shape[-2:]
            attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device).tril_(n_k - n_q)
        if attn_mask is not None:
            scores = scores.masked_fill_(~attn_mask, float("-inf"))
        if sinks is None:
            return scores.softmax(-1).to(values.dtype) @ values
        sink = sinks.float()[None, :, None, None].expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
        return probs.to(values.dtype) @ values

    return attend
