"""The fused CUDA kernels (`kernels/fused.py`, Triton) behind a gate the layers can import:
Triton is imported on the first CUDA call only, so `import lmserve` never needs it."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def usable(x: torch.Tensor) -> bool:
    """Whether the fused kernels take `x`: a CUDA tensor of a float dtype, last dim contiguous."""
    return x.is_cuda and x.dtype in _HALF_AND_FLOAT and x.stride(-1) == 1


@functools.cache
def _fused() -> ModuleType:
    # by name, as the attention registry loads backends: no static import edge to Triton
    return importlib.import_module("lmserve.kernels.fused")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    return _fused().rms_norm(x, weight, eps, residual)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return _fused().silu_and_mul(gate_up)


def rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return _fused().rotary_(x, cos, signed_sin)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _fused().grouped_matmul(x, w, offsets)
