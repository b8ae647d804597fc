"""A decode step's decoder layers in one C++ call, on CPU in float32.

At one token per request a layer's kernels take ~100 us (SmolLM2-135M) and the Python that
calls them ~50 us more: a third of a one-stream step (Gemma's six norms a layer, more).
`kernels/cpu/decode_layers.cpp` makes the same kernel calls in the same order from C++, so
tokens are the layer-by-layer path's bit for bit. It runs where every layer is a plain Llama
(pre-norm, SiLU) or Gemma 2/3 layer with no tensor parallelism, LoRA, or attention sinks, whose
linears are float32 weights, int8 ones (`--quantization int8`) or GGUF blocks the kernels read
(`gguf`, `gguf_q8`, `int4`), and only for steps whose rows are all decode rows of the C++
attention backend; anything else takes the layers one by one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmserve.attention.cpu import CpuMetadata
from lmserve.forward_context import get_attn_metadata
from lmserve.kernels import cpu_ops
from lmserve.layers.attention import Attention
from lmserve.layers.gguf_layers import GGUFLinear
from lmserve.layers.int8_linear import Int8Linear
from lmserve.layers.linear import Linear
from lmserve.layers.norm import GemmaRMSNorm, RMSNorm


@dataclass(frozen=True)
class LayerParts:
    """What the C++ loop needs of one layer: its norms (Llama: input, post-attention; Gemma:
    input, post-attention, pre-MLP, post-MLP, then q's and k's where it has them), its q/k/v,
    o, gate/up and down linears in that order, its attention, and which of the model's rotary
    tables it uses."""

    norms: tuple[nn.Module, ...]
    linears: tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    attention: Attention
    rope: int = 0


@dataclass(frozen=True)
class DecodeLayers:
    norms: list[torch.Tensor]  # the norms' weights, per layer (Gemma's as 1 + w)
    weights: list[torch.Tensor]  # per linear: its weights (as _plan lists them), then its bias
    plan: list[int]  # per linear: kind, out_features, has bias[, GGUF parts and their layout]
    attentions: list[Attention]  # their kv_cache as bound now (sleep unbinds it)
    windows: list[int]
    rope_of: list[int]
    shape: tuple[int, int, int]  # num_heads, num_kv_heads, head_dim
    scales: tuple[float, float, float]  # attention scale, soft cap (0: none), norm eps
    flags: tuple[bool, bool, bool]  # Gemma layers, q/k norms, q8 activations
    max_rows: int  # from this many rows on the GGUF linears take another path

    @classmethod
    def build(cls, layers: list[LayerParts | None], gemma: bool = False) -> DecodeLayers | None:
        """The loop's arguments, or None where a layer is not one it runs."""
        if not layers or any(p is None for p in layers):
            return None
        parts: list[LayerParts] = layers  # type: ignore[assignment]
        # (a CUDA model never builds the CPU kernels for it)
        if parts[0].norms[0].weight.device.type != "cpu" or not cpu_ops.available():
            return None
        norm_type = GemmaRMSNorm if gemma else RMSNorm
        counts = (4, 6) if gemma else (2,)
        norms = [n for p in parts for n in p.norms]
        linears = [linear for p in parts for linear in p.linears]
        plans = [_plan(x) for x in linears]
        first = parts[0].attention
        geometry = (first.num_heads, first.num_kv_heads, first.head_dim, first.scale)
        if (
            len({len(p.norms) for p in parts}) != 1
            or len(parts[0].norms) not in counts
            or any(type(n) is not norm_type or n.eps != norms[0].eps for n in norms)
            or any(p is None for p in plans)
            or len({x.q8_activations for x in linears if type(x) is GGUFLinear}) > 1
            or any(
                (a.num_heads, a.num_kv_heads, a.head_dim, a.scale) != geometry
                or a.soft_cap != first.soft_cap
                or a.sinks is not None
                for a in (p.attention for p in parts)
            )
        ):
            return None
        weights: list[torch.Tensor] = []
        plan: list[int] = []
        for linear_plan, linear_weights in plans:  # type: ignore[misc]
            plan += linear_plan
            weights += linear_weights
        return cls(
            # (Gemma's norms compute 1 + w at each call: the same float32 values)
            norms=[(1.0 + n.weight.float()) if gemma else n.weight.detach() for n in norms],
            weights=weights,
            plan=plan,
            attentions=[p.attention for p in parts],
            windows=[p.attention.sliding_window or 0 for p in parts],
            rope_of=[p.rope for p in parts],
            shape=(first.num_heads, first.num_kv_heads, first.head_dim),
            scales=(first.scale, first.soft_cap or 0.0, norms[0].eps),
            flags=(gemma, len(parts[0].norms) == 6, any(_q8(x) for x in linears)),
            max_rows=min(getattr(x, "kernel_rows", _ANY_ROWS) for x in linears),
        )

    def __call__(
        self, x: torch.Tensor, ropes: list[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last MLP output, residual stream) of every layer over the embedded tokens x, or
        None (nothing run) where this step is not one the loop takes. `ropes`: the model's
        (cos, signed_sin) per rotary table, as `LayerParts.rope` numbers them."""
        metadata = get_attn_metadata()
        if (
            not isinstance(metadata, CpuMetadata)
            or metadata.prefill is not None
            or metadata.decode is None
            or x.shape[0] >= self.max_rows
            or any(len(rope) != 2 for rope in ropes)
            or not cpu_ops.usable(x)
        ):
            return None
        decode = metadata.decode
        return cpu_ops.decode_layers(
            x,
            [t for rope in ropes for t in rope],
            self.rope_of,
            self.norms,
            self.weights,
            self.plan,
            [a.kv_cache for a in self.attentions],  # type: ignore[misc]
            self.windows,
            (decode.block_table, decode.seq_lens, decode.token_index, metadata.slot_mapping),
            self.shape,
            self.scales,
            self.flags,
        )


class DecodeLoop:
    """A model's DecodeLayers, built at its first forward: the weights are in by then, and
    LoRA has wrapped the layers it serves."""

    def __init__(self, gemma: bool = False) -> None:
        self.gemma = gemma
        self.layers: DecodeLayers | None = None
        self._built = False

    def __call__(
        self,
        parts: Callable[[], list[LayerParts | None]],
        x: torch.Tensor,
        ropes: list[tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """DecodeLayers' result for this step, or None where the layers take it one by one.
        `parts`: each layer's LayerParts, asked for once."""
        if not self._built:
            self.layers = DecodeLayers.build(parts(), self.gemma)
            self._built = True
        return None if self.layers is None else self.layers(x, ropes)


_BLOCKS, _INT8, _FLOAT = 0, 1, 2  # the C++ loop's linear kinds
_ANY_ROWS = 1 << 62


def _q8(linear: nn.Module) -> bool:
    return type(linear) is GGUFLinear and linear.q8_activations


def _plan(linear: nn.Module) -> tuple[list[int], list[torch.Tensor]] | None:
    """One linear's entry in the loop's plan and its tensors (kernels/cpu/decode_layers.cpp
    says how they are read), or None where it is not a kind the loop computes."""
    if type(linear) not in (GGUFLinear, Int8Linear, Linear):
        return None
    bias = [] if linear.bias is None else [linear.bias.detach()]
    head = [linear.out_features, len(bias)]
    if type(linear) is GGUFLinear:
        blocks = linear.block_parts()
        if blocks is None:
            return None
        plan = [_BLOCKS, *head, len(blocks)]
        for qtype, column, _ in blocks:
            plan += [qtype, column]
        return plan, [part for _, _, part in blocks] + bias
    if type(linear) is Int8Linear and linear.cpu_kernels:
        return [_INT8, *head], [linear.weight, linear.weight_scale, *bias]
    if type(linear) is Linear and linear.weight.dtype == torch.float32:
        return [_FLOAT, *head], [linear.weight.detach(), *bias]
    return None
