"""MXFP4 (OCP microscaling FP4), as gpt-oss's checkpoints store their experts' weights: blocks of
32 e2m1 values, two to a byte (low nibble first), sharing one power-of-two scale byte (E8M0,
bias 127). Dequantized once at load: every such value is exact in fp32 and bf16, so the model
runs the weights the checkpoint holds.
"""

from __future__ import annotations

import torch

# e2m1: sign, two exponent bits, one mantissa bit
_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_SCALE_BIAS = 127


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks uint8 [..., groups, 16] and scales uint8 [..., groups] -> float32 [..., groups *
    32]: each row of the checkpoint's [out, in] weight, in its order."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            "expected [..., groups, 16] and [..., groups]"
        )
    table = torch.tensor(_E2M1, dtype=torch.float32)
    packed = blocks.to(torch.uint8).long()
    values = torch.stack([table[packed & 0x0F], table[packed >> 4]], dim=-1).flatten(-2)
    exponents = scales.to(torch.int32).unsqueeze(-1) - _SCALE_BIAS
    return torch.ldexp(values, exponents).flatten(-2)
