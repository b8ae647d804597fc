"""The CPU backend (C++ decode kernel, C++ K/V store, torch_ref's SDPA prefill) against
torch_ref, the oracle, over the attention shapes and batch layouts the engine produces."""

from __future__ import annotations

import pytest
import torch

from lmserve import LLM
from lmserve.attention.cpu import CpuBackend, CpuMetadata
from lmserve.attention.torch_ref import TorchRefBackend, TorchRefMetadata
from lmserve.engine.args import create_engine_config
from lmserve.kernels import cpu_ops
from tests.attention.test_torch_ref import make_batch
from tests.engine.test_llm import PreemptionCounter, random_prompts, run_greedy

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")

CPU = torch.device("cpu")


def _compare(common, cache, q, k, v, **options) -> CpuMetadata:
    """options: window, soft_cap, sinks."""
    backend = CpuBackend(CPU)
    metadata = backend.build_metadata(common)
    assert isinstance(metadata, CpuMetadata)
    cpu_cache = cache.clone()
    out = backend.forward(q, k, v, cpu_cache, metadata, 0.3, **options)
    ref_cache = cache.clone()
    ref_backend = TorchRefBackend(CPU)
    ref_metadata = ref_backend.build_metadata(common)
    expected = ref_backend.forward(q, k, v, ref_cache, ref_metadata, 0.3, **options)
    assert torch.equal(cpu_cache, ref_cache)  # the same K/V stored at the same slots
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    return metadata


SHAPES = {  # SmolLM2, MHA, Qwen2.5-0.5B, Llama-3, wide groups
    "smollm2": dict(heads=9, kv_heads=3, head_dim=64),
    "mha-16": dict(heads=4, kv_heads=4, head_dim=16),
    "qwen2.5": dict(heads=14, kv_heads=2, head_dim=64),
    "llama3": dict(heads=8, kv_heads=2, head_dim=128),
    "group16-d48": dict(heads=16, kv_heads=1, head_dim=48),
    "d256": dict(heads=2, kv_heads=1, head_dim=256),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("block_size", [16, 4])
def test_decode_rows_with_scattered_shared_and_partial_blocks(shape, block_size) -> None:
    # rows end mid-block or on a block edge; rows 0 and 2 share their first (prefix) block
    rows = [(1, block_size * 2), (1, 3), (1, block_size + 5), (1, block_size * 3 - 1)]
    tables = [[7, 2, 30], [12], [7, 21], [5, 40, 9]]
    _compare(*make_batch(rows, tables, 41, block_size=block_size, **shape))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(
    "options",
    [
        dict(window=5),
        dict(window=1),
        dict(soft_cap=0.7),
        dict(window=20, soft_cap=0.7),
        dict(sinks=True),
        dict(window=5, sinks=True),
    ],
)
def test_sliding_window_soft_cap_and_sinks(shape, options) -> None:
    # windows that start mid-block, on a block edge, past short rows; a capped score range;
    # sinks (gpt-oss's), some larger than any score, some smaller
    rows = [(1, 32), (1, 3), (1, 21), (1, 47), (5, 12)]
    tables = [[7, 2, 30], [12], [7, 21], [5, 40, 9], [3, 4]]
    if options.get("sinks"):
        options = {**options, "sinks": torch.linspace(-3.0, 3.0, shape["heads"])}
    _compare(*make_batch(rows, tables, 41, block_size=16, **shape), **options)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_decode_rows_beside_prefill_chunks(shape) -> None:
    # decode, chunk with context, decode, first chunk: the kernel and SDPA fill one output
    rows = [(1, 9), (11, 3), (1, 2), (12, 0)]
    tables = [[5, 6, 7], [1, 2, 9, 10], [8], [3, 4, 11]]
    metadata = _compare(*make_batch(rows, tables, 12, **shape))
    assert metadata.decode is not None and metadata.prefill is not None
    assert metadata.decode.seq_lens.tolist() == [10, 3]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_short_queries_run_as_a_decode_row_per_token(shape) -> None:
    """A speculative step's few tokens (and any chunk of up to 8): token j of a query sees
    the keys up to its own position, as SDPA's causal mask has it."""
    rows = [(5, 9), (1, 4), (8, 0), (3, 13), (9, 2)]
    tables = [[5, 6, 7, 12], [1, 2], [8, 13], [3, 4, 11, 14], [9, 10, 15]]
    metadata = _compare(*make_batch(rows, tables, 16, **shape))
    assert metadata.decode is not None and metadata.prefill is not None  # 9 tokens: SDPA
    assert metadata.decode.seq_lens.tolist() == [
        *range(10, 15), 5, *range(1, 9), *range(14, 17)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "rows", [[(1, 40)], [(7, 0)], [(3, 5), (6, 0)]], ids=["lone-decode", "prefill", "chunks"]
)
def test_a_lone_decode_row_and_prefill_only_steps(rows) -> None:
    tables = [[2, 1, 3], [4, 5]][: len(rows)]
    _compare(*make_batch(rows, tables, 6, block_size=16, **SHAPES["smollm2"]))


def test_long_contexts() -> None:
    rows = [(1, 1000), (1, 517)]
    tables = [list(range(1, 64)), list(range(64, 97))]
    _compare(*make_batch(rows, tables, 97, block_size=16, **SHAPES["llama3"]))


def test_without_kernels_every_step_is_torch_ref() -> None:
    backend = CpuBackend(CPU)
    backend.kernels = False  # as where the kernels could not be built
    common, cache, q, k, v = make_batch(
        [(1, 9), (5, 3)], [[1, 2, 3], [4, 5]], 6, **SHAPES["smollm2"]
    )
    metadata = backend.build_metadata(common)
    assert isinstance(metadata, TorchRefMetadata)
    ref = TorchRefBackend(CPU)
    expected = ref.forward(q, k, v, cache.clone(), ref.build_metadata(common), 0.3)
    assert torch.equal(backend.forward(q, k, v, cache.clone(), metadata, 0.3), expected)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_engine_tokens_match_torch_ref(tiny_model_dirs, kind) -> None:
    """Chunked prefill beside decode rows, prefix hits and preemption, through both backends."""
    path = str(tiny_model_dirs[kind])
    shared = random_prompts([40], seed=3)[0]
    prompts = random_prompts([5, 17, 33, 64, 3, 1]) + [shared + [1, 2], shared + [3]]
    kwargs = dict(num_kv_blocks=30, block_size=4, max_model_len=100, max_num_batched_tokens=24)
    cpu = LLM(path, **kwargs)
    assert type(cpu.engine_core.runner.backend) is CpuBackend
    cpu.step_hook = hook = PreemptionCounter(cpu)
    tokens = run_greedy(cpu, prompts)
    assert hook.preempted
    assert run_greedy(LLM(path, attention_backend="torch_ref", **kwargs), prompts) == tokens


def test_auto_picks_the_cpu_backend_where_its_kernel_fits(tiny_model_dirs) -> None:
    path = str(tiny_model_dirs["llama"])
    assert create_engine_config(path).attention_backend == "cpu"
    assert create_engine_config(path, dtype="bfloat16").attention_backend == "torch_ref"
    with pytest.raises(ValueError, match="attention_backend='cpu' needs float32"):
        create_engine_config(path, dtype="bfloat16", attention_backend="cpu")
