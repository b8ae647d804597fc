"""Mixture-of-experts MLPs: a router picks each token's top-k experts, and the experts' SwiGLU
MLPs run grouped over the tokens sorted by expert, never a loop over tokens: on CPU in float32
one C++ pass per projection over every expert (kernels/cpu/ops.cpp `grouped_matmul`), on CUDA
one Triton launch (kernels/fused.py), else one GEMM per expert.

Expert weights are stacked in HF's [experts, out, in] layout, which the CPU kernel streams: at
batch 64 a Qwen3-30B-A3B layer routes ~4 rows to each of its 128 experts, so the step reads every
expert's weights and is bound by memory bandwidth, where oneDNN's 4-row GEMMs reach a third of
it. A token's expert outputs are summed in ascending expert order, as HF's loop over experts
sums them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import cpu_ops, cuda_ops
from lmserve.layers.activation import silu_and_mul


@dataclass(frozen=True)
class Routing:
    """How a model turns router logits into top-k weights (HF's variants)."""

    top_k: int
    renormalize: bool  # top-k probabilities divided by their sum (Mixtral, Qwen3-MoE)
    softmax_after_topk: bool = False  # the top-k logits softmaxed among themselves (gpt-oss)


class Router(nn.Module):
    """Router logits, in HF's [experts, hidden] layout and op (F.linear), so routing decisions
    round exactly as HF's do; not a Linear, so int8 quantization leaves it alone."""

    def __init__(self, hidden_size: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation on [..., 2n] (gate | up): the gate clamped above and the up
    projection both ways at `limit`, then (up + 1) * gate * sigmoid(alpha * gate)."""

    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def select_experts(logits: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, k] in the logits' dtype, expert ids [tokens, k]): softmax in fp32, top-k,
    renormalized if the model does; or top-k of the logits, then their softmax."""
    if routing.softmax_after_topk:
        top, ids = torch.topk(logits, routing.top_k, dim=-1)
        return torch.softmax(top, dim=1, dtype=top.dtype), ids
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, routing.top_k, dim=-1)
    if routing.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


@dataclass(frozen=True)
class ExpertGroups:
    """Rows sorted by expert: expert e's rows are offsets[e]..offsets[e + 1]."""

    offsets: torch.Tensor  # [experts + 1] int64
    row_expert: torch.Tensor  # [rows]: each sorted row's expert


Project = Callable[[torch.Tensor, ExpertGroups], torch.Tensor]


def run_grouped(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int, project: Project
) -> torch.Tensor:
    """sum_k weights[t, k] * expert(ids[t, k], x[t]) for every token t: the (token, slot) rows
    sorted by expert go through `project` together, and each token's terms are added in
    ascending expert order."""
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert, ascending
    token = order // top_k
    # not bincount: on CUDA it reads the largest id back to the host, which graphs cannot capture
    counts = torch.zeros(num_experts, dtype=torch.long, device=x.device).index_add_(
        0, flat, torch.ones_like(flat)
    )
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    groups = ExpertGroups(offsets, flat.index_select(0, order))
    out = project(x.index_select(0, token), groups)
    out.mul_(weights.reshape(-1, 1).index_select(0, order))
    return torch.zeros_like(x).index_add_(0, token, out)


def each_expert(expert_mlp: Callable[[int, torch.Tensor], torch.Tensor]) -> Project:
    """A `project` that calls `expert_mlp(e, rows)` once per expert on the rows routed to it
    (an expert's MLP maps the hidden size back to itself)."""

    def project(rows: torch.Tensor, groups: ExpertGroups) -> torch.Tensor:
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(groups.offsets.diff().tolist()):
            if count:
                out[start : start + count] = expert_mlp(expert, rows[start : start + count])
                start += count
        return out

    return project


class FusedMoE(nn.Module):
    """`num_experts` gated MLPs: w13 [experts, 2 * inter, hidden] (gate | up), w2 [experts,
    hidden, inter], optional biases b13 [experts, 2 * inter] and b2 [experts, hidden] (gpt-oss's,
    added after each product as HF adds them); `activation` maps gate | up to inter (SwiGLU
    unless given)."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        bias: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.b13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [tokens, hidden]; weights, ids [tokens, k] from select_experts."""
        if cuda_ops.usable(x):  # Triton: no host sync, so CUDA graphs capture it
            project = functools.partial(self._kernel_project, cuda_ops)
        elif cpu_ops.usable(x) and self.w13.dtype == torch.float32:
            project = functools.partial(self._kernel_project, cpu_ops)
        else:
            project = each_expert(self._expert)
        return run_grouped(x, weights, ids, self.num_experts, project)

    def _kernel_project(
        self, ops: ModuleType, rows: torch.Tensor, groups: ExpertGroups
    ) -> torch.Tensor:
        """Both projections over every expert at once, with `ops`' grouped_matmul."""
        gate_up = ops.grouped_matmul(rows, self.w13, groups.offsets)
        if self.b13 is not None:
            gate_up.add_(self.b13.index_select(0, groups.row_expert))
        out = ops.grouped_matmul(self.activation(gate_up), self.w2, groups.offsets)
        if self.b2 is not None:
            out.add_(self.b2.index_select(0, groups.row_expert))
        return out

    def _expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(rows, self.w13[expert])
        if self.b13 is not None:
            gate_up = gate_up + self.b13[expert]
        out = F.linear(self.activation(gate_up), self.w2[expert])
        if self.b2 is not None:
            out = out + self.b2[expert]
        return out

    def load_expert(self, expert: int, kind: str, tensor: torch.Tensor) -> None:
        """One expert's HF tensor: `gate` or `up` [inter, hidden], or `down` [hidden, inter]."""
        inter = self.intermediate_size
        with torch.no_grad():
            if kind == "down":
                self.w2[expert].copy_(tensor)
            else:
                start = 0 if kind == "gate" else inter
                self.w13[expert, start : start + inter].copy_(tensor)

    def load_stacked(self, kind: str, tensor: torch.Tensor) -> None:
        """transformers 5's stacked layout: `gate_up` [experts, 2 * inter, hidden] or `down`
        [experts, hidden, inter]."""
        with torch.no_grad():
            (self.w2 if kind == "down" else self.w13).copy_(tensor)
