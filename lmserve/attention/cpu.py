"""The CPU backend: torch_ref's cache layout and prefill path, with C++ kernels where it is hot.

Decode rows attend in one pass over their blocks per KV head, with an online softmax
(`kernels/cpu/ops.cpp`), so each cached K/V byte is read once and no per-block intermediates
are written: at batch 64, context 192, SmolLM2 on 2 cores, a layer's decode attention took
~1.1 ms against 2.7-4.6 ms for torch_ref's block-by-block matmuls (docs/benchmarks.md). K/V are
stored by a C++ copy instead of two index_put ops. A short query (a speculative step's few
tokens) runs as one decode row per token, each seeing the keys up to its own position: a
5-token query over 300 keys took 126 us a layer that way against 299 us through SDPA, the same
values to 3e-7 (SmolLM2's 9 heads / 3 KV heads of 64, 2 cores).
Prefill chunks keep torch_ref's SDPA path, which is compute-efficient.

Where the kernels cannot be built (no C++ compiler) every step runs through torch_ref.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmserve.attention.backend import CommonAttentionMetadata, ranks_from_end
from lmserve.attention.torch_ref import SdpaGroup, TorchRefBackend, TorchRefMetadata, attend_group
from lmserve.kernels import cpu_ops

# Queries of at most this many tokens run as decode rows, one per token.
_MAX_DECODE_QUERY = 8


@dataclass(frozen=True)
class _DecodeRows:
    """The kernel's view of the step's decode rows."""

    block_table: torch.Tensor  # [rows, max_blocks] int32, cut to the longest row's blocks
    seq_lens: torch.Tensor  # [rows] int32
    token_index: torch.Tensor  # [rows] int64 token (= query) of each row


@dataclass(frozen=True)
class CpuMetadata:
    backend: CpuBackend
    slot_mapping: torch.Tensor  # [num_tokens] int64
    decode: _DecodeRows | None
    prefill: SdpaGroup | None


class CpuBackend(TorchRefBackend):
    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.kernels = cpu_ops.available()

    def build_metadata(self, common: CommonAttentionMetadata) -> CpuMetadata | TorchRefMetadata:
        if not self.kernels:
            return super().build_metadata(common)
        query_lens = common.query_lens
        is_decode = query_lens <= _MAX_DECODE_QUERY
        rows = np.flatnonzero(is_decode)
        decode = None
        if len(rows):
            # one row per token, each seeing its request's keys up to its own position
            lens = query_lens[rows]
            row_req = np.repeat(rows, lens)
            after = ranks_from_end(lens)  # the query's tokens after this one
            seq_lens = common.seq_lens[row_req] - after
            max_blocks = -(-int(seq_lens.max()) // common.block_size)
            decode = _DecodeRows(
                block_table=torch.from_numpy(
                    np.ascontiguousarray(common.block_table[row_req, :max_blocks], dtype=np.int32)
                ),
                seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
                token_index=torch.from_numpy(
                    (common.query_start_loc[row_req + 1] - 1 - after).astype(np.int64)
                ),
            )
        prefill_rows = np.flatnonzero(~is_decode)
        prefill = self._build_group(common, prefill_rows) if len(prefill_rows) else None
        return CpuMetadata(self, common.slot_mapping, decode, prefill)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: CpuMetadata | TorchRefMetadata,
        scale: float,
        *,
        window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        options = (window, soft_cap, sinks)
        if isinstance(metadata, TorchRefMetadata):
            return super().forward(
                q, k, v, kv_cache, metadata, scale, window=window, soft_cap=soft_cap, sinks=sinks
            )
        key_cache, value_cache = kv_cache[0], kv_cache[1]  # [num_blocks, kv_heads, block_size, d]
        cpu_ops.store_kv(k, v, key_cache, value_cache, metadata.slot_mapping)
        prefill = metadata.prefill
        if prefill is not None and prefill.covers_batch:
            return attend_group(q, key_cache, value_cache, prefill, scale, *options).reshape(
                q.shape
            )
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        decode = metadata.decode
        if decode is not None:
            cpu_ops.decode_attention(
                q,
                key_cache,
                value_cache,
                decode.block_table,
                decode.seq_lens,
                decode.token_index,
                out,
                scale,
                window,
                soft_cap,
                sinks,
            )
        if prefill is not None:
            attn = attend_group(q, key_cache, value_cache, prefill, scale, *options)
            out[prefill.token_index] = attn[prefill.valid]
        return out
