"""Backend interface: build per-step metadata once, then run every layer's attention with it."""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class CommonAttentionMetadata:
    """Backend-neutral description of one step's batch (host arrays + the device slot mapping).

    Rows are requests in batch order; tokens of row i are query_start_loc[i]:query_start_loc[i+1].
    """

    query_start_loc: np.ndarray  # [num_reqs + 1] int
    seq_lens: np.ndarray  # [num_reqs] context length once this step's tokens are stored
    block_table: np.ndarray  # [num_reqs, max_blocks] int32, padded with the null block 0
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each token's K/V goes
    block_size: int

    @property
    def query_lens(self) -> np.ndarray:
        return np.diff(self.query_start_loc)


def ranks(counts: np.ndarray) -> np.ndarray:
    """0, 1, ..., n - 1 for each n in `counts`, concatenated: each token's place in its query."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def ranks_from_end(counts: np.ndarray) -> np.ndarray:
    """n - 1, ..., 1, 0 for each n in `counts`, concatenated: the tokens after each in its query."""
    return np.repeat(counts, counts) - 1 - ranks(counts)


@dataclass(frozen=True)
class StaticDecodeInputs:
    """Device buffers a captured decode step reads its attention inputs from (CUDA graphs replay
    fixed addresses). Sized for the largest captured batch; row i is request i, one token each."""

    query_start_loc: torch.Tensor  # [max_rows + 1] int32, always 0..max_rows
    seq_lens: torch.Tensor  # [max_rows] int32
    block_table: torch.Tensor  # [max_rows, max_blocks_per_seq] int32
    slot_mapping: torch.Tensor  # [max_rows] int64; -1 = padding, nothing stored


class AttentionBackend(abc.ABC):
    """Stateless apart from device; metadata is rebuilt each step and shared by all layers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def kv_cache_shape(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int
    ) -> tuple[int, ...]:
        """One layer's cache, keys at [0] and values at [1]; token-major unless the backend's
        kernels read another layout faster."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    @abc.abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """Turn the step's batch description into whatever this backend's kernels consume."""

    @abc.abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: Any,
        scale: float,
        *,
        window: int | None = None,
        soft_cap: float | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store k/v at metadata's slots, then attend; returns [num_tokens, num_heads, head_dim].

        window: a query sees only the last `window` keys up to itself, itself included (HF's and
        vLLM's `sliding_window`); soft_cap: scores s become soft_cap * tanh(s / soft_cap) before
        the softmax (Gemma 2's attention logit soft-capping); sinks [num_heads]: a logit per head
        added to the softmax's denominator with no value (gpt-oss's attention sinks)."""

    supports_cuda_graphs = False

    def graph_decode_metadata(self, static: StaticDecodeInputs, num_rows: int) -> Any:
        """Metadata over the first `num_rows` rows of `static`, whose kernel launches depend on
        `num_rows` alone (backends with supports_cuda_graphs)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run in a CUDA graph")


_BACKENDS = {
    "cpu": "lmserve.attention.cpu:CpuBackend",
    "torch_ref": "lmserve.attention.torch_ref:TorchRefBackend",
    "triton": "lmserve.attention.triton:TritonBackend",
}


def get_backend(name: str, device: torch.device) -> AttentionBackend:
    """Import the named backend only when asked for, so optional kernels never load by default."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    module_name, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(device)
