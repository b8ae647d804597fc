"""Paged attention in plain torch: the CPU backend, and the oracle for every other backend.

Requests are grouped into decode rows (one query token) and the rest (prefill chunks, with or
without cached context). Each group is padded into batched SDPA calls: K/V are gathered
block-wise through the block table (a cache-sized slice of rows at a time), and a boolean mask
hides padding and future positions.
Padded block-table entries point at the null block, which stays zero, so no NaN leaks in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmserve.attention.backend import AttentionBackend, CommonAttentionMetadata

# K/V gathered per SDPA call: rows are attended in slices whose gathered blocks stay in cache
# between the gather and the read (at batch 64, context 192, SmolLM2: 2.8 -> 2.1-2.4 ms a layer).
_GATHER_BYTES = 2 << 20


@dataclass(frozen=True)
class _Group:
    """Rows attended in one SDPA call."""

    query_index: torch.Tensor  # [rows, max_q] token index of each padded query (pad: 0)
    block_table: torch.Tensor  # [rows * max_blocks] int64, flattened
    mask: torch.Tensor | None  # [rows, 1, max_q, num_keys] True = attend; None: see is_causal
    is_causal: bool  # no mask needed: one row whose keys are exactly its queries (or one query)
    num_keys: int  # keys attended per row (gathered blocks are cut to this)
    valid: torch.Tensor  # [rows, max_q] True where the query is real
    token_index: torch.Tensor  # [num_valid] token index of each real query, in valid order
    covers_batch: bool  # the group is the whole batch, unpadded: no gather/scatter of queries


@dataclass(frozen=True)
class TorchRefMetadata:
    backend: TorchRefBackend
    slot_mapping: torch.Tensor
    groups: tuple[_Group, ...]


class TorchRefBackend(AttentionBackend):
    def build_metadata(self, common: CommonAttentionMetadata) -> TorchRefMetadata:
        query_lens = common.query_lens
        is_decode = query_lens == 1
        groups = []
        for rows in (np.flatnonzero(is_decode), np.flatnonzero(~is_decode)):
            if len(rows):
                groups.append(self._build_group(common, rows))
        return TorchRefMetadata(self, common.slot_mapping, tuple(groups))

    def _build_group(self, common: CommonAttentionMetadata, rows: np.ndarray) -> _Group:
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
        return _Group(
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
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TorchRefMetadata,
        scale: float,
    ) -> torch.Tensor:
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, block_size, kv_heads, d]
        num_kv_heads, head_dim = key_cache.shape[-2:]
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, k)
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, metadata.slot_mapping, v)
        out = torch.empty_like(q)
        for group in metadata.groups:
            rows = group.valid.shape[0]
            if group.covers_batch:
                query = q.view(rows, -1, *q.shape[1:])
            else:
                query = q.index_select(0, group.query_index.view(-1)).view(rows, -1, *q.shape[1:])
            attn = torch.empty_like(query)  # [rows, max_q, heads, d]
            blocks_per_row = group.block_table.shape[0] // rows
            row_bytes = 2 * blocks_per_row * key_cache[0].nbytes
            step = max(1, _GATHER_BYTES // row_bytes)
            for start in range(0, rows, step):
                end = min(rows, start + step)
                # index_select on the flattened table: far cheaper than advanced indexing on CPU
                table = group.block_table[start * blocks_per_row : end * blocks_per_row]
                keys = key_cache.index_select(0, table).view(
                    end - start, -1, num_kv_heads, head_dim
                )
                values = value_cache.index_select(0, table).view(
                    end - start, -1, num_kv_heads, head_dim
                )
                attn[start:end] = F.scaled_dot_product_attention(
                    query[start:end].transpose(1, 2),  # [rows, heads, max_q, d]
                    keys[:, : group.num_keys].transpose(1, 2),
                    values[:, : group.num_keys].transpose(1, 2),
                    attn_mask=None if group.mask is None else group.mask[start:end],
                    is_causal=group.is_causal,
                    scale=scale,
                    enable_gqa=True,
                ).transpose(1, 2)
            if group.covers_batch:
                return attn.reshape(q.shape)
            out[group.token_index] = attn[group.valid]
        return out
