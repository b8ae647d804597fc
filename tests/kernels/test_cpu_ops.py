"""The C++ CPU kernels' building, and their int8 passes against the torch expressions they
replace (decode attention is checked through the CPU backend, tests/attention/test_cpu.py)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils import cpp_extension

from lmserve.kernels import cpu_ops

needs_kernels = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")


def _torch_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    return torch.div(x, scale).round_().to(torch.int8), scale


@needs_kernels
@pytest.mark.parametrize(("rows", "cols"), [(1, 576), (64, 1536), (3, 37), (40, 5)])
def test_quantize_rows_equals_torch(rows: int, cols: int) -> None:
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols)) * 3
    x[0, :3] = torch.tensor([0.5, -0.5, 1.5]) * x[0].abs().max() / 127  # ties round to even
    q, scale = cpu_ops.quantize_rows(x)
    expected_q, expected_scale = _torch_quantize(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    zeros_q, zeros_scale = cpu_ops.quantize_rows(torch.zeros(2, cols))
    assert not zeros_q.any() and torch.equal(zeros_scale, torch.full((2, 1), 1e-12 / 127))


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("rows", "cols"), [(1, 960), (64, 3072), (5, 49)])
def test_dequantize_in_place_equals_torch(bias: bool, rows: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(rows * cols)
    acc = torch.randint(-(2**20), 2**20, (rows, cols), dtype=torch.int32, generator=gen)
    x_scale, w_scale = torch.rand(rows, 1, generator=gen), torch.rand(cols, generator=gen)
    b = torch.randn(cols, generator=gen) if bias else None
    expected = acc.float().mul_(x_scale).mul_(w_scale)
    if b is not None:
        expected.add_(b)
    out = cpu_ops.dequantize_(acc, x_scale, w_scale, b)
    assert out.data_ptr() == acc.data_ptr() and out.dtype == torch.float32
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "supported"),
    [
        (9, 3, 64, True),
        (32, 8, 128, True),
        (16, 1, 256, True),
        (4, 2, 8, False),
        (32, 1, 64, False),
        (2, 1, 512, False),
        (12, 2, 80, True),
        (4, 4, 72, False),
    ],
)
def test_decode_attention_supported_shapes(heads, kv_heads, head_dim, supported) -> None:
    assert cpu_ops.decode_attention_supported(heads, kv_heads, head_dim) is supported


def test_a_failed_build_is_a_warning_and_torch_paths(monkeypatch, caplog) -> None:
    def failing_build(**kwargs):
        raise RuntimeError("Error building extension\nops.cpp:1:10: fatal error: x.h: missing\n")

    monkeypatch.setattr(cpp_extension, "load", failing_build)
    with caplog.at_level(logging.WARNING, logger="lmserve.kernels.cpu_ops"):
        assert cpu_ops.available.__wrapped__() is False
    assert "did not build" in caplog.text and "fatal error: x.h: missing" in caplog.text
