"""SiLU-and-multiply of the fused gate/up projection's halves, and the encoders' activations by
their HF config names."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_ops, cuda_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2n] -> silu(gate) * up, [..., n]; one pass on CPU in float32 (the same values) and
    one kernel on CUDA."""
    n = gate_up.shape[-1] // 2
    if cpu_ops.usable(gate_up) and gate_up.is_contiguous():
        return cpu_ops.silu_and_mul(gate_up.view(-1, 2 * n)).view(*gate_up.shape[:-1], n)
    if cuda_ops.usable(gate_up) and gate_up.is_contiguous():
        return cuda_ops.silu_and_mul(gate_up.view(-1, 2 * n)).view(*gate_up.shape[:-1], n)
    gate, up = gate_up.split(n, dim=-1)
    return F.silu(gate) * up


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a config's `hidden_act` (or `projector_hidden_act`) names, as HF's."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]
