"""SiLU-and-multiply of the fused gate/up projection's halves."""

from __future__ import annotations

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
