"""The C++ CPU kernels' building, their int8 passes against the torch expressions they replace,
and their GGUF blocks against gguf-py (decode attention is checked through the CPU backend,
tests/attention/test_cpu.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import gguf
import numpy as np
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


@needs_kernels
@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (64, 576), (7, 40)])
def test_rms_norm_and_its_fused_residual_add(rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x, residual = torch.randn(2, rows, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    expected = weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # HF's form
    # the sum of squares is accumulated in another order than torch's mean: last-bit differences
    torch.testing.assert_close(cpu_ops.rms_norm(x, weight, 1e-5), expected, rtol=1e-6, atol=1e-6)
    summed = residual + x
    out = cpu_ops.add_rms_norm_(residual, x, weight, 1e-5)
    assert torch.equal(residual, summed)
    torch.testing.assert_close(out, cpu_ops.rms_norm(summed, weight, 1e-5), rtol=0, atol=0)


@needs_kernels
@pytest.mark.parametrize(("rows", "n"), [(1, 1536), (64, 1536), (3, 21)])
def test_silu_and_mul_equals_torch(rows: int, n: int) -> None:
    gate_up = torch.randn(rows, 2 * n, generator=torch.Generator().manual_seed(n)) * 4
    expected = torch.nn.functional.silu(gate_up[:, :n]) * gate_up[:, n:]
    torch.testing.assert_close(cpu_ops.silu_and_mul(gate_up), expected, rtol=1e-6, atol=1e-7)
    if n % 16 == 0:  # whole vectors: torch's own vectorized expression, bit for bit
        assert torch.equal(cpu_ops.silu_and_mul(gate_up), expected)


@needs_kernels
@pytest.mark.parametrize("head_dim", [64, 128, 24])
def test_rotary_in_place_equals_the_torch_expression(head_dim: int) -> None:
    from lmserve.layers.rotary import RotaryEmbedding

    cos, sin = RotaryEmbedding(head_dim, 256, 10000.0, None)(torch.arange(5, 37), torch.float32)
    qkv = torch.randn(32, 12, head_dim)
    qk = qkv[:, :9]  # a strided view, as the model rotates q and k inside the qkv output
    expected = qk * cos + qk.roll(head_dim // 2, dims=-1) * sin
    untouched = qkv[:, 9:].clone()
    cpu_ops.rotary_(qk, cos, sin)
    assert torch.equal(qk, expected) and torch.equal(qkv[:, 9:], untouched)


@needs_kernels
@pytest.mark.parametrize(
    ("counts", "n", "k"),
    [([4, 0, 9, 1], 1536, 64), ([1, 2, 3], 70, 24), ([0, 0, 5], 3, 17)],
    ids=["tiles-and-empty-expert", "partial-tile-and-k-tail", "fewer-columns-than-a-block"],
)
def test_grouped_matmul_equals_each_experts_product(counts: list[int], n: int, k: int) -> None:
    """Each expert's rows times its [out, in] weight, close to torch's product; and a row's
    result the same bit for bit whatever rows share its expert."""
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(len(counts), n, k, generator=gen)
    x = torch.randn(sum(counts), k, generator=gen)
    offsets = torch.tensor([0, *counts]).cumsum(0)
    out = cpu_ops.grouped_matmul(x, w, offsets)
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        torch.testing.assert_close(out[rows], x[rows] @ w[e].T, rtol=1e-5, atol=1e-5)
        for r in range(rows.start, rows.stop):
            alone = torch.zeros(len(counts) + 1, dtype=torch.long)
            alone[e + 1 :] = 1
            assert torch.equal(cpu_ops.grouped_matmul(x[r : r + 1], w, alone)[0], out[r])


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("counts", "n", "k"), [([4, 0, 9, 1], 96, 64), ([1, 2, 3], 70, 45)])
def test_grouped_matmul_int8_equals_int_mm_per_expert(counts, n: int, k: int, bias: bool) -> None:
    """Exact int32 sums (a K that is not a multiple of 32 included), dequantized as dequantize_."""
    gen = torch.Generator().manual_seed(k)
    w = torch.randint(-127, 128, (len(counts), n, k), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(len(counts), n, generator=gen)
    b = torch.randn(len(counts), n, generator=gen) if bias else None
    x_q, x_scale = cpu_ops.quantize_rows(torch.randn(sum(counts), k, generator=gen))
    offsets = torch.tensor([0, *counts]).cumsum(0)
    out = cpu_ops.grouped_matmul_int8(x_q, x_scale, w, w_scale, offsets, b)
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        if rows.start == rows.stop:
            continue
        acc = torch._int_mm(x_q[rows], w[e].t())
        bias_e = None if b is None else b[e]
        expected = cpu_ops.dequantize_(acc.contiguous(), x_scale[rows], w_scale[e], bias_e)
        assert torch.equal(out[rows], expected)


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path) -> None:
    """torch waits forever on a build lock; one older than any build is removed, a fresh one
    (a build under way) is left alone."""
    import os
    import time

    from lmserve.kernels.cpu_ops import clear_stale_lock

    assert not clear_stale_lock(tmp_path)
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_lock(tmp_path) and lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_lock(tmp_path) and not lock.exists()


GGUF_TYPES = [gguf.GGMLQuantizationType[name] for name in cpu_ops.GGUF_TYPES.values()]
_K_QUANTS = {
    gguf.GGMLQuantizationType.Q4_K: (0, 2),  # where their half scales sit in a super-block
    gguf.GGMLQuantizationType.Q5_K: (0, 2),
    gguf.GGMLQuantizationType.Q6_K: (208,),
}


def _assert_sum_close(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """out is x @ dense.T summed in another order: within float32's rounding of the sum of
    absolute products (a result near zero from large terms is not relatively close)."""
    bound = 1e-5 * (x.abs() @ dense.abs().t()) + 1e-6
    assert ((out - x @ dense.t()).abs() <= bound).all()


def _depth(qtype) -> int:
    """A K (inputs) of a few blocks: 5 of 32, or 2 super-blocks of 256 for the K-quants."""
    return 512 if qtype in _K_QUANTS else 160


def _gguf_weight(qtype, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of a random [n, k] weight (gguf-py's quantization, or for the K-quants, which
    gguf-py only dequantizes, random bytes under sane half scales), and gguf-py's own
    dequantization of them."""
    rng = np.random.default_rng(seed)
    if qtype in _K_QUANTS:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        blocks = rng.integers(0, 256, (n, k // block_size, block_bytes), dtype=np.uint8)
        for at in _K_QUANTS[qtype]:
            scales = rng.uniform(0.002, 0.02, (n, k // block_size)).astype(np.float16)
            blocks[..., at : at + 2] = scales[..., None].view(np.uint8)
        blocks = blocks.reshape(n, -1)
    else:
        blocks = gguf.quants.quantize(rng.standard_normal((n, k)).astype(np.float32), qtype)
    dense = gguf.quants.dequantize(blocks, qtype).astype(np.float32)
    return torch.from_numpy(blocks), torch.from_numpy(dense)


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_dequantize_is_bit_exact_to_gguf_py(qtype) -> None:
    k = _depth(qtype)
    blocks, dense = _gguf_weight(qtype, 37, k, seed=int(qtype))
    assert torch.equal(cpu_ops.gguf_dequantize(blocks, int(qtype), k), dense)


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 9, 15])
def test_gguf_matmul_equals_the_dequantized_product(qtype, rows: int) -> None:
    """Odd shapes (37 outputs, a few blocks deep), every register-tile remainder, written into
    columns 3.. of a wider output whose other columns stay untouched."""
    k = _depth(qtype)
    blocks, dense = _gguf_weight(qtype, 37, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    out = torch.full((rows, 45), 7.0)
    cpu_ops.gguf_matmul(x, blocks, int(qtype), out, 3)
    _assert_sum_close(out[:, 3:40], x, dense)
    assert (out[:, :3] == 7.0).all() and (out[:, 40:] == 7.0).all()


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_matmul_rows_do_not_depend_on_their_batch(qtype) -> None:
    """A row's product is bitwise the same computed alone or among 15 (every register tile),
    so a request's numbers do not depend on what is batched with it."""
    k = _depth(qtype)
    blocks, _ = _gguf_weight(qtype, 37, k, seed=3)
    x = torch.randn(15, k, generator=torch.Generator().manual_seed(5))
    batched = torch.empty(15, 37)
    cpu_ops.gguf_matmul(x, blocks, int(qtype), batched, 0)
    for r in range(15):
        alone = torch.empty(1, 37)
        cpu_ops.gguf_matmul(x[r : r + 1].clone(), blocks, int(qtype), alone, 0)
        assert torch.equal(alone[0], batched[r])


def _q8_reference(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """llama.cpp's product with q8 activations, in float64: x per 32-value block to int8 (d =
    amax / 127, round half to even) and back, times the weights as gguf-py dequantizes them.
    (The kernel's exact integer dots, scaled by both d's, plus the offsets through the
    activation blocks' sums, are the same sum in another order.)"""
    rows, k = x.shape
    xb = x.numpy().reshape(rows, k // 32, 32)
    d = np.abs(xb).max(axis=2) / np.float32(127)
    inverse = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    q = np.rint(xb * inverse[..., None])
    x8 = (q * d[..., None].astype(np.float64)).reshape(rows, k)
    return torch.from_numpy((x8 @ dense.numpy().astype(np.float64).T).astype(np.float32))


def _assert_q8_close(out: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    """out is _q8_reference accumulated in float32: within float32's rounding of the sum of
    absolute products, as _assert_sum_close (a fixed tolerance failed on a near-cancelling
    K-quant row: 1.2e-4 off a value of 1.0 whose terms summed to ~100 in size)."""
    bound = 1e-5 * (x.abs() @ dense.abs().t()) + 1e-6
    assert ((out - _q8_reference(x, dense)).abs() <= bound).all()


@needs_kernels
@pytest.mark.parametrize("qtype", GGUF_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 11])
def test_gguf_matmul_q8_is_llama_cpps_product(qtype, rows: int) -> None:
    """q8 activations: the integer-dot product llama.cpp computes (not the float32 one, which
    it stays near), for every pass width (8 rows a pass, then the rest)."""
    k = _depth(qtype)
    blocks, dense = _gguf_weight(qtype, 37, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by it
    out = torch.full((rows, 40), 7.0)
    cpu_ops.gguf_matmul_q8(x, blocks, int(qtype), out, 2)
    _assert_q8_close(out[:, 2:39], x, dense)
    assert (out[:, :2] == 7.0).all() and (out[:, 39:] == 7.0).all()
    exact = x @ dense.t()
    assert ((out[:, 2:39] - exact).norm() / exact.norm()).item() < 0.02


@needs_kernels
def test_gguf_matmul_rejects_what_it_cannot_read() -> None:
    blocks, _ = _gguf_weight(GGUF_TYPES[0], 8, 64, seed=0)
    with pytest.raises(RuntimeError, match="unsupported GGUF type"):
        cpu_ops.gguf_matmul(torch.randn(1, 64), blocks, 10, torch.empty(1, 8), 0)  # Q2_K
    with pytest.raises(RuntimeError, match="out"):
        cpu_ops.gguf_matmul(torch.randn(1, 64), blocks, 2, torch.empty(1, 8), 1)
    with pytest.raises(RuntimeError, match="K must be a multiple of 256"):
        cpu_ops.gguf_matmul_q8(torch.randn(1, 64), blocks, 12, torch.empty(1, 8), 0)  # Q4_K


_CAPABILITY_RUN = """
import sys, torch
from lmserve.kernels import cpu_ops
capability, _, vnni = sys.argv[1].partition("-")
assert torch.backends.cpu.get_cpu_capability() == capability
if not vnni:  # the AVX-512 build of a CPU without VNNI
    cpu_ops.cpu_flags = lambda: frozenset()
assert cpu_ops.available()
results = {}
inputs = torch.load(sys.argv[2])
for qtype, (x, blocks) in inputs.pop("gguf").items():
    out, out_q8 = torch.empty(x.shape[0], blocks.shape[0]), torch.empty(x.shape[0], blocks.shape[0])
    cpu_ops.gguf_matmul(x, blocks, qtype, out, 0)
    cpu_ops.gguf_matmul_q8(x, blocks, qtype, out_q8, 0)
    results[qtype] = (cpu_ops.gguf_dequantize(blocks, qtype, x.shape[1]), out, out_q8)
results["int8"] = cpu_ops.grouped_matmul_int8(*inputs["int8"], None)
torch.save(results, sys.argv[3])
"""


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512", "AVX512-VNNI"])
def test_gguf_and_int8_kernels_in_each_simd_build(capability: str, tmp_path) -> None:
    """The scalar, AVX2, AVX-512 and AVX-512 VNNI builds all, whichever this CPU would pick
    (torch's ATEN_CPU_CAPABILITY forces a narrower one; VNNI is left out of a build by hiding
    the CPU's flag; each built once into its own cache directory): GGUF kernels against gguf-py
    and the q8 reference, the grouped int8 GEMM exactly against torch's int8 GEMM."""
    if capability.startswith("AVX512") and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    if capability.endswith("VNNI") and "avx512_vnni" not in cpu_ops.cpu_flags():
        pytest.skip("this CPU has no AVX-512 VNNI")
    inputs = {}
    for qtype in GGUF_TYPES:
        blocks, _ = _gguf_weight(qtype, 37, _depth(qtype), seed=int(qtype))
        inputs[int(qtype)] = (torch.randn(15, _depth(qtype)), blocks)  # 8 + 4 + 2 + 1 rows
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (3, 70, 200), dtype=torch.int8, generator=gen)
    w_scale = torch.rand(3, 70, generator=gen)
    x_q, x_scale = cpu_ops.quantize_rows(torch.randn(9, 200, generator=gen))
    offsets = torch.tensor([0, 5, 5, 9])
    torch.save({"gguf": inputs, "int8": (x_q, x_scale, w, w_scale, offsets)}, tmp_path / "in.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability.partition("-")[0].lower()}
    args = [capability, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")]
    done = subprocess.run(
        [sys.executable, "-c", _CAPABILITY_RUN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = torch.load(tmp_path / "out.pt")
    for qtype in GGUF_TYPES:
        x, blocks = inputs[int(qtype)]
        dense = torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), qtype).astype(np.float32))
        weights, out, out_q8 = results[int(qtype)]
        assert torch.equal(weights, dense)
        _assert_sum_close(out, x, dense)
        _assert_q8_close(out_q8, x, dense)
    for e in range(3):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        acc = torch._int_mm(x_q[rows], w[e].t()) if rows.start < rows.stop else None
        if acc is not None:
            expected = cpu_ops.dequantize_(acc.contiguous(), x_scale[rows], w_scale[e], None)
            assert torch.equal(results["int8"][rows], expected)
