"""The Triton backend: one paged-attention kernel for decode rows and prefill chunks alike.

Metadata is copied to the device once per step and shared by every layer. Loaded only through
the backend registry, so `import lmserve` never imports Triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.attention.backend import (
    AttentionBackend,
    CommonAttentionMetadata,
    StaticDecodeInputs,
)
from lmserve.kernels.paged_attention import paged_attention, store_kv
from lmserve.transfer import to_device

# Split-KV heuristic (untuned): each split should get a few hundred keys, and splitting only
# pays while the batch alone leaves the GPU short of programs.
_TOKENS_PER_SPLIT = 512
_MAX_SPLITS = 16
_TARGET_DECODE_PROGRAMS = 1024  # per KV head: decode rows x splits


def choose_num_splits(query_lens: np.ndarray, seq_lens: np.ndarray) -> int:
    """Splits for the decode rows (query_len 1) of a step: 1 (off) unless a context is long."""
    decode_seq_lens = seq_lens[query_lens == 1]
    if not len(decode_seq_lens):
        return 1
    by_length = int(decode_seq_lens.max()) // _TOKENS_PER_SPLIT
    by_occupancy = _TARGET_DECODE_PROGRAMS // len(decode_seq_lens)
    return max(1, min(_MAX_SPLITS, by_length, by_occupancy))


def graph_num_splits(num_rows: int) -> int:
    """Splits for a captured decode batch: fixed per batch size, since a graph cannot look at
    context lengths. Splits past a row's keys exit at once and the reduce ignores them."""
    return max(1, min(_MAX_SPLITS, _TARGET_DECODE_PROGRAMS // num_rows))


@dataclass(frozen=True)
class TritonMetadata:
    backend: TritonBackend
    query_start_loc: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32
    block_table: torch.Tensor  # [num_reqs, blocks covering max_seq_len] int32
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    num_splits: int  # split-KV ranges for decode rows; 1 = off


class TritonBackend(AttentionBackend):
    def build_metadata(self, common: CommonAttentionMetadata) -> TritonMetadata:
        query_lens = common.query_lens
        seq_lens = np.asarray(common.seq_lens)
        max_seq_len = int(seq_lens.max()) if len(seq_lens) else 0
        # Only the columns any row can reach travel to the device.
        num_cols = max(1, -(-max_seq_len // common.block_size))
        block_table = np.ascontiguousarray(common.block_table[:, :num_cols], dtype=np.int32)
        return TritonMetadata(
            backend=self,
            query_start_loc=self._to_device(common.query_start_loc),
            seq_lens=self._to_device(seq_lens),
            block_table=self._to_device(block_table),
            slot_mapping=to_device(common.slot_mapping, self.device),
            max_query_len=int(query_lens.max()) if len(query_lens) else 0,
            num_splits=choose_num_splits(query_lens, seq_lens),
        )

    supports_cuda_graphs = True

    def graph_decode_metadata(self, static: StaticDecodeInputs, num_rows: int) -> TritonMetadata:
        return TritonMetadata(
            backend=self,
            query_start_loc=static.query_start_loc[: num_rows + 1],
            seq_lens=static.seq_lens[:num_rows],
            block_table=static.block_table[:num_rows],
            slot_mapping=static.slot_mapping[:num_rows],
            max_query_len=1,
            num_splits=graph_num_splits(num_rows),
        )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return to_device(np.asarray(array, dtype=np.int32), self.device)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: TritonMetadata,
        scale: float,
        *,
        window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        store_kv(k, v, kv_cache, metadata.slot_mapping)
        return paged_attention(
            q,
            kv_cache,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_table,
            scale,
            max_query_len=metadata.max_query_len,
            num_splits=metadata.num_splits,
            window=window,
            soft_cap=soft_cap,
            sinks=sinks,
        )
