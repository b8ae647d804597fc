"""The fused CUDA kernels (RMSNorm, SiLU-and-mul, rotary) against the torch forms they replace:
on CPU through Triton's interpreter, compiled for sm_90 ahead of time, and on a GPU in half
precision. An engine routed through them (interpreted) still gives HF's greedy tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lmserve.kernels import cpu_ops, cuda_ops, fused  # noqa: E402
from lmserve.layers.activation import silu_and_mul  # noqa: E402
from lmserve.layers.norm import RMSNorm  # noqa: E402
from lmserve.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Interpreted on CPU: fp32 and fp16 (numpy has no bfloat16); on a GPU all three.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.fixture
def torch_forms(monkeypatch):
    """The layers' plain-torch forms: neither the C++ CPU kernels nor the fused ones."""
    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    monkeypatch.setattr(cuda_ops, "usable", lambda x: False)


def _tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-5, rtol=1e-5)}.get(dtype, dict(atol=1e-2, rtol=1e-2))


def _rand(*shape, dtype, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 100])
def test_rms_norm_with_and_without_residual(torch_forms, dtype, hidden: int) -> None:
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(_rand(hidden, dtype=dtype, seed=1) * 0.1 + 1)
    x, residual = _rand(7, hidden, dtype=dtype), _rand(7, hidden, dtype=dtype, seed=2) * 3
    expected_sum = residual + x
    expected = norm(x.clone(), residual.clone())  # the torch form: add in place, then norm
    torch.testing.assert_close(fused.rms_norm(x, norm.weight, 1e-6), norm(x.clone()), **_tol(dtype))
    got_residual = residual.clone()
    got = fused.rms_norm(x, norm.weight, 1e-6, got_residual)
    torch.testing.assert_close(got_residual, expected_sum, **_tol(dtype))  # added in place
    torch.testing.assert_close(got, expected, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(torch_forms, dtype) -> None:
    gate_up = _rand(5, 2 * 1500, dtype=dtype) * 4  # more than one column block
    torch.testing.assert_close(fused.silu_and_mul(gate_up), silu_and_mul(gate_up), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "head_dim"), [(32, 8, 128), (9, 3, 64), (5, 1, 80)]
)
def test_rotary_rotates_a_strided_view_in_place(torch_forms, dtype, q_heads, kv_heads, head_dim):
    """q and k as the model hands them over: a view of the fused qkv rows."""
    tokens = 6
    rope = RotaryEmbedding(head_dim, 64, 10000.0, None).to(DEVICE)
    cos, sin = rope(torch.tensor([0, 1, 5, 17, 33, 63], device=DEVICE), dtype)
    qkv = _rand(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    qk = qkv[:, : (q_heads + kv_heads) * head_dim].view(tokens, -1, head_dim)
    expected = apply_rotary(qk.clone(), (cos, sin))
    v_before = qkv[:, (q_heads + kv_heads) * head_dim :].clone()
    assert fused.rotary_(qk, cos, sin) is qk
    torch.testing.assert_close(qk, expected, **_tol(dtype))
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim :], v_before)  # v untouched


def test_empty_batches() -> None:
    x = torch.empty(0, 64, device=DEVICE)
    assert fused.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 64)
    assert fused.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests run these kernels for real")
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_engine_through_the_fused_kernels_matches_hf(tiny_model_dirs, monkeypatch, kind) -> None:
    """The layers' wiring: every norm, SiLU and rotary of a chunked, preempted run goes through
    the fused kernels (interpreted on CPU), and the greedy tokens are still HF's."""
    from transformers import AutoModelForCausalLM

    from lmserve import LLM
    from tests.engine.test_llm import NUM_NEW, SCENARIOS, hf_greedy, random_prompts, run_greedy

    calls = {"rms_norm": 0, "silu_and_mul": 0, "rotary_": 0}
    for name in calls:
        kernel = getattr(fused, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(fused, name, counted)
    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    monkeypatch.setattr(cuda_ops, "usable", lambda x: x.is_floating_point() and x.stride(-1) == 1)
    prompts = random_prompts([5, 17, 33])
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[kind], dtype=torch.float32).eval()
    expected = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    llm = LLM(
        str(tiny_model_dirs[kind]), kv_cache_memory_gb=0.01, **SCENARIOS["preemption_chunked"]
    )
    assert run_greedy(llm, prompts) == expected
    assert all(calls.values()), calls


_COMPILE_FOR_SM90 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from lmserve.kernels import fused

# the grouped expert GEMM's index pointers
INDEX_POINTERS = {"offsets_ptr": "*i64", "block_expert_ptr": "*i32", "block_start_ptr": "*i32"}

def build(kernel, dtype, **constexprs):
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        if name in INDEX_POINTERS:
            return INDEX_POINTERS[name]
        if name.endswith("_ptr"):
            return "*" + dtype
        return "fp32" if name == "eps" else "i32"
    names = kernel.arg_names
    signature = {name: arg_type(name) for name in names}
    bound = {(names.index(k),): v for k, v in constexprs.items()}
    compile(ASTSource(kernel, signature, bound), target=GPUTarget("cuda", 90, 32))

for dtype in ("bf16", "fp32"):
    build(fused._rms_norm_kernel, dtype, HAS_RESIDUAL=True, BLOCK=4096)
    build(fused._rms_norm_kernel, dtype, HAS_RESIDUAL=False, BLOCK=1024)
    build(fused._silu_and_mul_kernel, dtype, BLOCK=1024)
    build(fused._rotary_kernel, dtype, HEADS_PAD=64, HALF_PAD=64)
    build(
        fused._grouped_matmul_kernel, dtype, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32,
        IEEE=dtype == "fp32",
    )
"""


def test_kernels_compile_for_h100() -> None:
    """The interpreter accepts what Triton's compiler rejects: compile sm_90 cubins (no driver
    needed) so CPU-only CI catches it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], check=True, env=env, timeout=300)


@pytest.mark.gpu
@needs_gpu
def test_gpu_layers_take_the_fused_kernels() -> None:
    """On CUDA the layers call the fused kernels (one launch each) and match the torch forms."""
    x = _rand(3, 256, dtype=torch.bfloat16)
    norm = RMSNorm(256, 1e-5).to(DEVICE, torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        norm(x)
        silu_and_mul(x)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("_rms_norm_kernel" in n for n in names) and any("_silu_and_mul" in n for n in names)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("counts", "n", "k"),
    [([3, 0, 20, 1], 96, 64), ([17, 1, 0, 33], 70, 40)],
    ids=["empty-expert-and-two-blocks", "ragged-blocks-and-tiles"],
)
def test_grouped_matmul_equals_each_experts_product(dtype, counts, n: int, k: int) -> None:
    """Each expert's rows (in blocks of 16, cut on the device) times its [out, in] weight."""
    w = _rand(len(counts), n, k, dtype=dtype, seed=3) * 0.2
    x = _rand(sum(counts), k, dtype=dtype, seed=4)
    offsets = torch.tensor([0, *counts], device=DEVICE).cumsum(0)
    out = fused.grouped_matmul(x, w, offsets)
    for e in range(len(counts)):
        rows = slice(int(offsets[e]), int(offsets[e + 1]))
        expected = (x[rows].float() @ w[e].float().T).to(dtype)
        torch.testing.assert_close(out[rows], expected, **_tol(dtype))


def _tiny_moe(path) -> torch.nn.Module:
    import transformers as tf

    from tests.conftest import _COMMON, _randomize

    torch.manual_seed(3)
    config = tf.Qwen3MoeConfig(
        **_COMMON, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, pad_token_id=0,
    )  # fmt: skip
    hf = tf.Qwen3MoeForCausalLM(config)
    _randomize(hf)
    hf.save_pretrained(path)
    return hf.eval()


def test_an_moe_model_through_the_triton_experts_gives_hfs_tokens(monkeypatch, tmp_path) -> None:
    """A Qwen3-MoE engine whose experts run the Triton kernel (interpreted) keeps HF's greedy
    tokens, batched and chunked."""
    from lmserve import LLM
    from tests.engine.test_llm import hf_greedy, random_prompts, run_greedy

    hf = _tiny_moe(tmp_path)
    calls = []

    def counted(x, w, offsets):
        calls.append(x.shape[0])
        return fused.grouped_matmul(x, w, offsets)

    monkeypatch.setattr(cuda_ops, "grouped_matmul", counted)
    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    monkeypatch.setattr(cuda_ops, "usable", lambda x: x.is_floating_point() and x.stride(-1) == 1)
    prompts = [[t or 1 for t in p] for p in random_prompts([5, 17, 9])]
    expected = [hf_greedy(hf, p, 6) for p in prompts]
    llm = LLM(str(tmp_path), kv_cache_memory_gb=0.01, max_num_batched_tokens=16)
    assert run_greedy(llm, prompts, num_new=6) == expected
    assert calls


@pytest.mark.gpu
@needs_gpu
def test_gpu_moe_model_gives_hfs_tokens_with_graphs(tmp_path) -> None:
    """On CUDA in fp32 the experts take the Triton kernel inside CUDA graphs: HF's tokens."""
    from lmserve import LLM
    from tests.engine.test_llm import hf_greedy, random_prompts, run_greedy

    hf = _tiny_moe(tmp_path)
    prompts = [[t or 1 for t in p] for p in random_prompts([5, 17, 9, 33])]
    expected = [hf_greedy(hf, p, 8) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01)
    assert llm.engine_core.runner.graphs is not None
    assert run_greedy(llm, prompts, num_new=8) == expected
