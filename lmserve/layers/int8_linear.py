"""Dynamic W8A8 int8 linear layers for CPU serving (`quantization="int8"`).

Weights are quantized once at load time, symmetrically per output channel; activations per
token at each call. The product runs as one int8 GEMM (`torch._int_mm`, oneDNN), which on a
2-core AVX-512 VNNI EPYC was 4-5x faster than the fp32 GEMM at batch 64 and reads a quarter of
the bytes at batch 1 (measured with SmolLM2-135M's shapes). Not exact: the fp32 path stays the
default and the oracle against HF transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve.kernels import cpu_ops
from lmserve.layers.linear import Linear

_QMAX = 127.0


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """`weight` is HF's [out, in] in floating point; it is quantized here."""
        super().__init__()
        weight = weight.float()
        scale = weight.abs().amax(dim=1).clamp_(min=1e-12) / _QMAX
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        # [out, in]: _int_mm reads it transposed, the faster layout for skinny activations
        self.register_buffer("weight", (weight / scale[:, None]).round_().to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # C++ quantize / dequantize passes (kernels/cpu/ops.cpp): the same values as the torch
        # expressions below in 2 passes instead of ~8 ops, which took ~2 s of a ~22 s int8
        # 64 x 128/128 run on SmolLM2 (2 cores, profiled)
        self.cpu_kernels = weight.device.type == "cpu" and cpu_ops.available()

    @classmethod
    def from_linear(cls, linear: Linear | nn.Linear) -> Int8Linear:
        """From our [in, out] Linear, or torch's [out, in] one (the encoders' layers)."""
        if isinstance(linear, Linear):
            return cls(linear.weight.detach().t(), linear.bias)
        return cls(linear.weight.detach(), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        if self.cpu_kernels:
            x_q, x_scale = cpu_ops.quantize_rows(x)
            out = torch._int_mm(x_q, self.weight.t())
            return cpu_ops.dequantize_(out, x_scale, self.weight_scale, self.bias).view(
                *shape[:-1], self.out_features
            )
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(_QMAX)
        x_q = torch.div(x, x_scale).round_().to(torch.int8)
        # the int32 -> float cast as its own pass, then in-place scales: 20% faster than a
        # mixed-dtype mul at prefill sizes
        out = torch._int_mm(x_q, self.weight.t()).float().mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features)


def quantize_linears(model: nn.Module) -> int:
    """Replace every linear layer in `model` (ours, or torch's in the encoders) with its int8
    twin; returns how many were replaced."""
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (Linear, nn.Linear))
    ]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, Int8Linear.from_linear(module))
    return len(targets)
