"""Int8Linear and Int8FusedMoE: close to the fp32 layers they replace, row results independent
of the batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmserve.kernels import cpu_ops
from lmserve.layers.int8_linear import Int8FusedMoE, Int8Linear, quantize_linears
from lmserve.layers.linear import Linear
from lmserve.layers.moe import FusedMoE, Routing, select_experts


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


def _experts() -> FusedMoE:
    torch.manual_seed(3)
    moe = FusedMoE(num_experts=6, hidden_size=64, intermediate_size=48)
    with torch.no_grad():
        moe.w13.normal_(0, 0.1)
        moe.w2.normal_(0, 0.1)
    return moe


def test_int8_experts_are_close_to_fp32_and_exact_per_token() -> None:
    moe = _experts()
    x = torch.randn(20, 64)
    weights, ids = select_experts(torch.randn(20, 6), Routing(top_k=2, renormalize=True))
    quantized = Int8FusedMoE(moe)
    assert quantized.w13.dtype == torch.int8 and quantized.w13.shape == (6, 96, 64)
    expected, got = moe(x, weights, ids), quantized(x, weights, ids)
    assert (got - expected).norm() / expected.norm() < 0.02
    for i in (0, 7, 19):  # a token's result does not depend on the others routed with it
        alone = quantized(x[i : i + 1], weights[i : i + 1], ids[i : i + 1])
        assert torch.equal(alone, got[i : i + 1])


@pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")
def test_the_grouped_int8_kernel_equals_one_gemm_per_expert() -> None:
    """The C++ pass over every expert gives what one torch._int_mm per expert gives, bit for bit."""
    moe = _experts()
    x = torch.randn(40, 64)
    weights, ids = select_experts(torch.randn(40, 6), Routing(top_k=2, renormalize=True))
    quantized = Int8FusedMoE(moe)
    assert quantized.cpu_kernels
    got = quantized(x, weights, ids)
    quantized.cpu_kernels = False
    assert torch.equal(got, quantized(x, weights, ids))


def test_quantize_linears_replaces_experts_too() -> None:
    model = nn.ModuleDict({"experts": _experts(), "proj": _linear(8, 4, False)})
    assert quantize_linears(model) == 2
    assert isinstance(model["experts"], Int8FusedMoE)
    assert isinstance(model["proj"], Int8Linear)
