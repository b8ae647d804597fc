"""RMSNorm with and without the fused residual add, through the C++ kernel and plain torch."""

from __future__ import annotations

import pytest
import torch

from lmserve.kernels import cpu_ops
from lmserve.layers.norm import GemmaRMSNorm, RMSNorm


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "torch"])
def test_residual_add_then_norm(monkeypatch, kernels: bool) -> None:
    if kernels and not cpu_ops.available():
        pytest.skip("no C++ compiler")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "usable", lambda x: False)
    norm = RMSNorm(48, 1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, residual = torch.randn(2, 3, 5, 48)
    summed = residual + x
    out = norm(x, residual)
    assert torch.equal(residual, summed)  # the stream carries the sum on to the next layer
    expected = norm.weight * (summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        norm(x),
        norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_norm_scales_by_one_plus_weight_in_fp32(monkeypatch, kernels, dtype) -> None:
    if kernels and not cpu_ops.available():
        pytest.skip("no C++ compiler")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "usable", lambda x: False)
    norm = GemmaRMSNorm(48, 1e-6).to(dtype)
    assert torch.equal(norm.weight, torch.zeros(48, dtype=dtype))  # zero-centred, as HF's
    with torch.no_grad():
        norm.weight.normal_(0, 0.1)
    x, residual = torch.randn(2, 4, 48).to(dtype)
    summed = (residual.float() + x.float()).to(dtype)
    out = norm(x, residual)
    assert torch.equal(residual, summed)
    s32 = summed.float()
    expected = s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = (expected * (1.0 + norm.weight.float())).to(dtype)  # HF's order, cast once
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
