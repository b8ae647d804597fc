"""A decode step's Llama-family layers in one C++ call, on CPU with GGUF-block weights.

At one token per request a layer's kernels take ~100 us (SmolLM2-135M) and the Python that
calls them ~50 us more: a third of a one-stream step. `kernels/cpu/decode_layers.cpp` makes the
same kernel calls in the same order from C++, so tokens are the layer-by-layer path's bit for
bit. It runs where every layer is a plain pre-norm SiLU layer (no tensor parallelism, LoRA,
q/k norms, soft-capping or sinks) whose linears all hold GGUF blocks the kernels read
(`--quantization gguf`, `gguf_q8`, `int4`), and only for steps whose rows are all decode rows
of the C++ attention backend; anything else takes the layers one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmserve.attention.cpu import CpuMetadata
from lmserve.forward_context import get_attn_metadata
from lmserve.kernels import cpu_ops
from lmserve.layers.attention import Attention
from lmserve.layers.gguf_layers import GGUFLinear
from lmserve.layers.norm import RMSNorm


@dataclass(frozen=True)
class LayerParts:
    """What the C++ loop needs of one layer: its two norms, its q/k/v, o, gate/up and down
    linears in that order, and its attention."""

    input_norm: nn.Module
    post_attention_norm: nn.Module
    linears: tuple[nn.Module, nn.Module, nn.Module, nn.Module]
    attention: Attention


@dataclass(frozen=True)
class DecodeLayers:
    norms: list[torch.Tensor]  # per layer: input norm, post-attention norm
    weights: list[torch.Tensor]  # per linear: its parts' blocks, then its bias
    plan: list[int]  # per linear: out_features, parts, has bias, then (type, column) per part
    attentions: list[Attention]  # their kv_cache as bound now (sleep unbinds it)
    windows: list[int]
    shape: tuple[int, int, int]  # num_heads, num_kv_heads, head_dim
    scale: float
    eps: float
    q8: bool
    max_rows: int  # from this many rows on the linears take another path

    @classmethod
    def build(cls, layers: list[LayerParts | None]) -> DecodeLayers | None:
        """The loop's arguments, or None where a layer is not one it runs."""
        if not layers or not cpu_ops.available() or any(p is None for p in layers):
            return None
        parts: list[LayerParts] = layers  # type: ignore[assignment]
        norms = [n for p in parts for n in (p.input_norm, p.post_attention_norm)]
        linears = [linear for p in parts for linear in p.linears]
        attention = parts[0].attention
        if (
            any(type(n) is not RMSNorm or n.eps != norms[0].eps for n in norms)
            or any(
                type(linear) is not GGUFLinear or linear.block_parts() is None for linear in linears
            )
            or len({linear.q8_activations for linear in linears}) != 1
            or any(
                (a.num_heads, a.num_kv_heads, a.head_dim, a.scale)
                != (
                    attention.num_heads,
                    attention.num_kv_heads,
                    attention.head_dim,
                    attention.scale,
                )
                or a.soft_cap is not None
                or a.sinks is not None
                for a in (p.attention for p in parts)
            )
        ):
            return None
        weights: list[torch.Tensor] = []
        plan: list[int] = []
        for linear in linears:
            blocks = linear.block_parts()
            plan += [linear.out_features, len(blocks), int(linear.bias is not None)]
            for qtype, column, part in blocks:
                plan += [qtype, column]
                weights.append(part)
            if linear.bias is not None:
                weights.append(linear.bias)
        return cls(
            norms=[n.weight.detach() for n in norms],
            weights=weights,
            plan=plan,
            attentions=[p.attention for p in parts],
            windows=[p.attention.sliding_window or 0 for p in parts],
            shape=(attention.num_heads, attention.num_kv_heads, attention.head_dim),
            scale=attention.scale,
            eps=norms[0].eps,
            q8=linears[0].q8_activations,
            max_rows=min(linear.kernel_rows for linear in linears),
        )

    def __call__(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last MLP output, residual stream) of every layer over the embedded tokens x, or
        None (nothing run) where this step is not one the loop takes."""
        metadata = get_attn_metadata()
        if (
            not isinstance(metadata, CpuMetadata)
            or metadata.prefill is not None
            or metadata.decode is None
            or x.shape[0] >= self.max_rows
            or len(rope) != 2
            or not cpu_ops.usable(x)
        ):
            return None
        decode = metadata.decode
        return cpu_ops.decode_layers(
            x,
            rope,  # type: ignore[arg-type]
            self.norms,
            self.weights,
            self.plan,
            [a.kv_cache for a in self.attentions],  # type: ignore[misc]
            self.windows,
            (decode.block_table, decode.seq_lens, decode.token_index, metadata.slot_mapping),
            self.shape,
            self.scale,
            self.eps,
            self.q8,
        )
