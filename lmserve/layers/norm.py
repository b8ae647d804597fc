"""RMSNorm computed in fp32 whatever the activation dtype, as HF does, optionally fused with the
residual add that precedes it (vLLM's fused_add_rms_norm); and Gemma's, which scales by
(1 + weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.kernels import cpu_ops, cuda_ops
from lmserve.layers.direct_call import DirectCall


class RMSNorm(DirectCall, nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize x; with `residual`, first add x into it in place and normalize the sum."""
        if cpu_ops.usable(x):  # one pass instead of ~6 ops (and the add)
            rows = x.reshape(-1, x.shape[-1])
            if residual is None:
                return cpu_ops.rms_norm(rows, self.weight, self.eps).view(x.shape)
            out = cpu_ops.add_rms_norm_(residual.view(rows.shape), rows, self.weight, self.eps)
            return out.view(x.shape)
        if cuda_ops.usable(x):  # one kernel instead of ~6 (and the add)
            rows = x.reshape(-1, x.shape[-1])
            res = None if residual is None else residual.view(rows.shape)
            return cuda_ops.rms_norm(rows, self.weight, self.eps, res).view(x.shape)
        if residual is not None:
            x = residual.add_(x)
        if x.dtype == torch.float32:  # one fused op; same result as the three-step form below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the checkpoint's weight is zero-centred and the output is scaled by
    (1 + weight), computed in fp32 and cast once at the end, as HF's Gemma norms do (folding the
    1 into a bf16 weight would round it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        if cpu_ops.usable(x):
            rows = x.reshape(-1, x.shape[-1])
            if residual is None:
                return cpu_ops.rms_norm(rows, scale, self.eps).view(x.shape)
            return cpu_ops.add_rms_norm_(residual.view(rows.shape), rows, scale, self.eps).view(
                x.shape
            )
        if residual is not None:
            x = residual.add_(x)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * scale).to(x.dtype)
