"""GGUFLinear (a fused layer's parts in GGUF blocks or float32) against the dequantized product,
and GGUFEmbedding against the dequantized table."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from lmserve.kernels import cpu_ops
from lmserve.layers import gguf_layers
from lmserve.layers.gguf_layers import (
    GGUFEmbedding,
    GGUFLinear,
    GGUFRows,
    kept_quantized,
    quantize_linears_int4,
    replace_embeddings,
    replace_linears,
)
from lmserve.layers.linear import Linear

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")

Q = gguf.GGMLQuantizationType


def _rows(qtype: Q, n: int, k: int, seed: int) -> tuple[GGUFRows, torch.Tensor]:
    rng = np.random.default_rng(seed)
    blocks = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    dense = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
    return GGUFRows(torch.from_numpy(blocks), int(qtype), k), dense


def _fused(
    bias: bool, q8_activations: bool = False
) -> tuple[GGUFLinear, torch.Tensor, torch.Tensor | None]:
    """q/k/v-like: a Q4_1 part, a Q8_0 part (a Q4_K_M file mixes types so), a float32 part
    (a type the kernels do not read), and two neighbouring Q4_0 parts that are joined."""
    k = 96
    q, q_dense = _rows(Q.Q4_1, 40, k, 1)
    kk, k_dense = _rows(Q.Q8_0, 16, k, 2)
    v_dense = torch.randn(16, k)
    a, a_dense = _rows(Q.Q4_0, 8, k, 3)
    b, b_dense = _rows(Q.Q4_0, 8, k, 4)
    layer = GGUFLinear(k, 88, bias=bias, q8_activations=q8_activations)
    layer.load_rows("weight", b, 80, 8)  # any order
    layer.load_rows("weight", q, 0, 40)
    layer.load_rows("weight", kk, 40, 16)
    layer.load_rows("weight", v_dense, 56, 16)
    layer.load_rows("weight", a, 72, 8)
    bias_values = torch.randn(88) if bias else None
    if bias:
        layer.load_rows("bias", bias_values, 0, 88)
    layer.finish_loading()
    dense = torch.cat([q_dense, k_dense, v_dense, a_dense, b_dense])
    return layer, dense, bias_values


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
@pytest.mark.parametrize("gemm_rows", [None, 24])  # 24: the AVX2 build's switch to one GEMM
def test_mixed_parts_equal_the_dequantized_layer(
    rows: int, bias: bool, gemm_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if gemm_rows is not None:
        monkeypatch.setattr(gguf_layers, "_GEMM_ROWS", gemm_rows)
    layer, dense, bias_values = _fused(bias)
    assert len([n for n, _ in layer.named_buffers() if n.startswith("part")]) == 4
    x = torch.randn(2, rows, 96)
    expected = x @ dense.t() + (0 if bias_values is None else bias_values)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rows", [1, 5, 40])
def test_q8_activations_are_row_by_row(rows: int) -> None:
    """q8: every quantized part through the integer-dot kernel however many rows, each row's
    values bitwise the same batched as alone, near (not at) the float32 product."""
    layer, dense, _ = _fused(bias=False, q8_activations=True)
    x = torch.randn(rows, 96)
    batched = layer(x)
    quantized = torch.cat([torch.arange(0, 56), torch.arange(72, 88)])  # not the float32 part
    for i in range(rows):
        assert torch.equal(layer(x[i : i + 1])[:, quantized], batched[i : i + 1, quantized])
    exact = x @ dense.t()
    assert 0 < ((batched - exact).norm() / exact.norm()).item() < 0.02


def test_a_layer_joins_its_parts_once_all_are_loaded() -> None:
    """Without waiting for finish_loading: only one layer's parts are ever held twice."""
    layer = GGUFLinear(64, 32, bias=False)
    layer.load_rows("weight", _rows(Q.Q8_0, 16, 64, 0)[0], 16, 16)
    assert not [n for n, _ in layer.named_buffers() if n.startswith("part")]
    layer.load_rows("weight", _rows(Q.Q8_0, 16, 64, 1)[0], 0, 16)
    assert [n for n, _ in layer.named_buffers() if n.startswith("part")] == ["part0"]
    layer.finish_loading()  # the loader still calls it: nothing changes
    assert [n for n, _ in layer.named_buffers() if n.startswith("part")] == ["part0"]
    assert layer(torch.randn(2, 64)).shape == (2, 32)


def test_rows_left_unset_are_an_error() -> None:
    layer = GGUFLinear(64, 32, bias=False)
    layer.load_rows("weight", _rows(Q.Q8_0, 16, 64, 0)[0], 0, 16)
    with pytest.raises(ValueError, match="rows 16.. of a linear layer unset"):
        layer.finish_loading()


def test_a_tensor_of_the_wrong_shape_is_an_error() -> None:
    layer = GGUFLinear(64, 32, bias=False)
    with pytest.raises(ValueError, match="expected 32 rows"):
        layer.load_rows("weight", _rows(Q.Q8_0, 16, 64, 0)[0], 0, 32)


def test_which_types_stay_quantized() -> None:
    kept = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    assert all(kept_quantized(int(t)) for t in kept)
    assert not any(kept_quantized(int(t)) for t in (Q.F32, Q.F16, Q.BF16, Q.Q2_K, Q.IQ4_NL))


def test_replace_linears_swaps_every_linear_for_an_empty_twin() -> None:
    model = torch.nn.Sequential(Linear(8, 4, bias=True), torch.nn.ReLU(), Linear(4, 2))
    layers = replace_linears(model, Linear)
    assert [type(m) for m in model] == [GGUFLinear, torch.nn.ReLU, GGUFLinear]
    assert layers == [model[0], model[2]]
    assert (model[0].in_features, model[0].out_features, model[0].bias.shape) == (8, 4, (4,))
    assert model[2].bias is None


@pytest.mark.parametrize(
    "qtype", [Q.Q8_0, Q.Q4_0, Q.Q5_1, None], ids=["Q8_0", "Q4_0", "Q5_1", "float32"]
)
def test_embedding_lookups_are_the_dequantized_rows(qtype) -> None:
    """Rows looked up in any shape (a batch's ids, repeats) are the table's rows exactly."""
    if qtype is None:
        dense = torch.randn(50, 64)
        table: torch.Tensor | GGUFRows = dense
    else:
        table, dense = _rows(qtype, 50, 64, 7)
    embedding = GGUFEmbedding(50, 64)
    embedding.load_rows("weight", table, 0, 50)
    ids = torch.tensor([[3, 49, 3], [0, 17, 8]])
    assert torch.equal(embedding(ids), dense[ids])


def test_an_embedding_loads_whole() -> None:
    embedding = GGUFEmbedding(50, 64)
    with pytest.raises(ValueError, match="loads whole"):
        embedding.load_rows("weight", torch.randn(10, 64), 0, 10)
    with pytest.raises(ValueError, match="shape"):
        embedding.load_rows("weight", torch.randn(50, 32), 0, 50)


def test_replace_embeddings_swaps_every_table() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), Linear(4, 2))
    replace_embeddings(model)
    assert isinstance(model[0], GGUFEmbedding) and isinstance(model[1], Linear)
    assert (model[0].num_embeddings, model[0].embedding_dim) == (10, 4)


def test_int4_restores_each_linear_as_gguf_py_blocks() -> None:
    """quantization="int4": Q4_1 blocks (Q8_0 for the LM head) exactly as gguf-py quantizes the
    layer's weight, the product that of the dequantized weight; a layer whose input is not a
    multiple of 32 wide stays float."""
    model = torch.nn.Module()
    model.body = Linear(64, 96, bias=True)
    model.odd = Linear(40, 8)
    model.lm_head = Linear(64, 50)
    for layer in (model.body, model.odd, model.lm_head):
        torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(model.body.bias)
    weights = {n: getattr(model, n).weight.detach().t().clone() for n in ("body", "lm_head")}
    bias = model.body.bias.detach().clone()
    assert quantize_linears_int4(model, Linear) == 2
    assert isinstance(model.odd, Linear)
    x = torch.randn(3, 64)
    for name, qtype in (("body", Q.Q4_1), ("lm_head", Q.Q8_0)):
        layer = getattr(model, name)
        assert isinstance(layer, GGUFLinear)
        blocks = gguf.quants.quantize(weights[name].numpy(), qtype)
        assert torch.equal(layer.part0, torch.from_numpy(blocks))
        dense = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
        expected = x @ dense.t() + (bias if name == "body" else 0)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=2e-5)
        exact = x @ weights[name].t() + (bias if name == "body" else 0)
        assert (layer(x) - exact).abs().max() > 1e-3  # the weights really were rounded
