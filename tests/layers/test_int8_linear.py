"""Int8Linear: close to the fp32 layer it replaces, row results independent of the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.layers.int8_linear import Int8Linear, quantize_linears
from lmserve.layers.linear import Linear


def _linear(in_features: int, out_features: int, bias: bool) -> Linear:
    gen = torch.Generator().manual_seed(in_features * out_features)
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.05)
        if bias:
            layer.bias.copy_(torch.randn(out_features, generator=gen))
    return layer


@pytest.mark.parametrize(("in_features", "out_features"), [(64, 96), (576, 49), (5, 7)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_close_to_fp32(in_features: int, out_features: int, bias: bool, rows: int) -> None:
    layer = _linear(in_features, out_features, bias)
    quantized = Int8Linear.from_linear(layer)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    expected, got = layer(x), quantized(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).norm() / expected.norm() < 0.02
    assert quantized.weight.dtype == torch.int8 and quantized.weight.shape == (
        out_features,
        in_features,
    )


def test_rows_do_not_depend_on_the_batch() -> None:
    """Activations are quantized per token and accumulated in int32: exact per row."""
    quantized = Int8Linear.from_linear(_linear(64, 32, bias=True))
    x = torch.randn(9, 64)
    whole = quantized(x)
    for i in range(9):
        assert torch.equal(quantized(x[i : i + 1]), whole[i : i + 1])
    assert torch.equal(quantized(x.view(3, 3, 64)), whole.view(3, 3, 32))


def test_zero_rows_stay_finite() -> None:
    quantized = Int8Linear.from_linear(_linear(16, 8, bias=True))
    out = quantized(torch.zeros(2, 16))
    assert torch.equal(out, quantized.bias.expand(2, 8))


def test_quantize_linears_replaces_every_linear() -> None:
    model = nn.Sequential(_linear(8, 16, False), nn.ReLU(), nn.Sequential(_linear(16, 4, True)))
    x = torch.randn(5, 8)
    expected = model(x)
    assert quantize_linears(model) == 2
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2
    assert (model(x) - expected).norm() / expected.norm() < 0.05


@pytest.mark.parametrize("bias", [False, True])
def test_cpu_kernels_give_the_torch_expressions_values(bias: bool) -> None:
    quantized = Int8Linear.from_linear(_linear(576, 960, bias))
    if not quantized.cpu_kernels:
        pytest.skip("no C++ compiler")
    x = torch.randn(7, 5, 576)
    with_kernels = quantized(x)
    quantized.cpu_kernels = False
    assert torch.equal(with_kernels, quantized(x))


def test_torch_linears_are_quantized_too() -> None:
    """Encoders (BERT) are built of torch's [out, in] nn.Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 8, bias=False))
    x = torch.randn(4, 32)
    expected = model(x)
    assert quantize_linears(model) == 2
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2
    assert (model(x) - expected).norm() / expected.norm() < 0.05
