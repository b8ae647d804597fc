"""Tensor-parallel layers: each rank holds a slice of a layer's weights and the ranks meet in one
collective where the slices join (Megatron's split, as vLLM's).

Q/K/V and gate/up are column-parallel (each rank computes some heads, some of the MLP's width);
O and down are row-parallel (each rank's partial sum, all-reduced); the token embedding and the
LM head are split by vocabulary (the embedding all-reduced, the logits gathered on rank 0,
which samples). Checkpoint tensors come whole; each layer takes its rank's slice as it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmserve.layers.linear import Linear
from lmserve.layers.shm_all_reduce import SharedMemoryAllReduce


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among `size` ranks, and the process group they meet in (its own,
    not torch.distributed's default group: two engines in one process do not share one)."""

    rank: int
    size: int
    group: dist.ProcessGroup
    # the ranks' shared memory, when they share a host: all-reduces of up to its slot size
    shm: SharedMemoryAllReduce | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (every rank holds bitwise the same sum)."""
        if self.shm is not None and self.shm.fits(x) and x.is_contiguous():
            return self.shm.all_reduce(x)
        self.group.allreduce([x]).wait()
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's [rows, vocab / size] logits joined to [rows, vocab] on rank 0 (the last
        rank's padding cut off); None on the other ranks."""
        logits = logits.contiguous()
        options = dist.GatherOptions()
        options.rootRank = 0
        if self.rank:
            self.group.gather([], [logits], options).wait()
            return None
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        self.group.gather([parts], [logits], options).wait()
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def min_over_ranks(self, value: int) -> int:
        """The smallest of each rank's `value` (what every rank can hold)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.group.allreduce([tensor], options).wait()
        return int(tensor.item())

    def vocab_shard(self, vocab_size: int) -> tuple[int, int]:
        """(first token id, rows) of this rank's slice of the vocabulary; every slice has the
        same rows, the last padded past the vocabulary."""
        rows = -(-vocab_size // self.size)
        return self.rank * rows, rows

    def num_kv_heads(self, total: int) -> int:
        """KV heads per rank: split, or one replicated on several ranks when fewer than them."""
        return max(1, total // self.size)

    def shard_config(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """A Llama-family config with this rank's sizes: heads, KV heads and MLP width divided
        (head_dim stated, as dividing the heads would change it); the vocabulary stays whole
        (the vocabulary-parallel layers take their slice of it)."""
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        return {
            **cfg,
            "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "num_attention_heads": heads // self.size,
            "num_key_value_heads": self.num_kv_heads(kv_heads),
            "intermediate_size": cfg["intermediate_size"] // self.size,
        }


def check_divisible(cfg: dict[str, Any], size: int) -> None:
    """Raise, naming the size that does not split, when a config cannot run on `size` ranks."""
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's {heads} attention heads; "
            f"use a size that does ({', '.join(str(n) for n in range(1, heads + 1) if heads % n == 0)})"
        )
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"tensor_parallel_size={size} neither divides the model's {kv_heads} KV heads nor is "
            "a multiple of them"
        )
    if cfg["intermediate_size"] % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the MLP width {cfg['intermediate_size']}"
        )


def column_slice(tp: TensorParallel, rows: int, size: int) -> int:
    """The first of `size` rows rank `tp.rank` takes of a part with `rows` rows: its own slice,
    or, where the part has fewer slices than there are ranks (KV heads fewer than ranks), the
    slice it shares (rank r takes slice r * slices // size)."""
    return tp.rank * (rows // size) // tp.size * size


class ColumnParallelLinear(Linear):
    """This rank's output rows of each fused part (q, k, v; gate, up). A part with fewer rows
    than the ranks need (KV heads fewer than ranks) is shared: rank r takes slice r * parts / size."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.tp = tp

    def load_rows(self, name: str, tensor: torch.Tensor, start: int, size: int) -> None:
        offset = column_slice(self.tp, tensor.shape[0], size)
        super().load_rows(name, tensor.narrow(0, offset, size), start, size)


class RowParallelLinear(Linear):
    """This rank's input columns; its output is a partial sum the model all-reduces (there,
    not here, so that a quantized replacement of this layer keeps the reduction). The bias is
    added once: rank 0 holds it, the others zeros."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel, bias: bool = False):
        super().__init__(in_features, out_features, bias)
        self.tp = tp

    def load_rows(self, name: str, tensor: torch.Tensor, start: int, size: int) -> None:
        if name == "weight":
            columns = tensor.narrow(1, self.tp.rank * self.in_features, self.in_features)
            super().load_rows(name, columns, start, size)
        elif self.tp.rank == 0:
            super().load_rows(name, tensor, start, size)


class VocabParallelHead(Linear):
    """The LM head's rows for this rank's slice of the vocabulary (zeros past its end)."""

    def __init__(self, in_features: int, vocab_size: int, tp: TensorParallel) -> None:
        first, rows = tp.vocab_shard(vocab_size)
        super().__init__(in_features, rows)
        self.first = first
        self.weight.data.zero_()

    def load_rows(self, name: str, tensor: torch.Tensor, start: int, size: int) -> None:
        _load_vocab_rows(self.weight.t(), tensor, self.first)


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the token embedding: ids outside its slice embed to zeros, and the
    sum over ranks is each id's one row."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.first, rows = tp.vocab_shard(vocab_size)
        self.weight = nn.Parameter(torch.zeros(rows, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)

    def load_rows(self, name: str, tensor: torch.Tensor, start: int, size: int) -> None:
        _load_vocab_rows(self.weight, tensor, self.first)


def _load_vocab_rows(table: torch.Tensor, tensor: torch.Tensor, first: int) -> None:
    """Copy `tensor`'s rows first.. (as many as `table` has, fewer at the vocabulary's end)."""
    rows = max(0, min(table.shape[0], tensor.shape[0] - first))
    with torch.no_grad():
        table[:rows].copy_(tensor[first : first + rows])
