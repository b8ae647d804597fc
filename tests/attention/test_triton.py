"""The Triton backend against the torch reference, and its kernels on their own.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET must be set
before the kernel module is imported), so these shapes stay tiny. With a GPU the same tests run
compiled on CUDA, and the `gpu` tests add half precision, long contexts and a CUDA-graph replay.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lmserve.attention.backend import CommonAttentionMetadata, get_backend  # noqa: E402
from lmserve.attention.torch_ref import TorchRefBackend  # noqa: E402
from lmserve.attention.triton import TritonBackend, choose_num_splits  # noqa: E402
from lmserve.kernels.paged_attention import paged_attention, store_kv  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton)"
)

BLOCK_SIZE = 16
# (query_len, context_len) per row: decode rows, prefill without context, a prefix-cached
# chunk starting on a block boundary, a chunked-prefill chunk starting mid-block, the first token
# of a sequence, and a decode row crossing several blocks.
MIXED_ROWS = [(1, 37), (19, 0), (1, 0), (5, 32), (11, 21), (1, 70)]
DECODE_ROWS = [(1, 0), (1, 15), (1, 16), (1, 130), (1, 47)]


@dataclass(frozen=True)
class Batch:
    common: CommonAttentionMetadata
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]


def make_batch(
    rows: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device = DEVICE,
    seed: int = 0,
    extra_cols: int = 2,
) -> Batch:
    """Random queries and a random cache; each row gets shuffled (non-contiguous) block ids and a
    block table padded with the null block 0, which stays zero as the engine keeps it."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-(q + c) // BLOCK_SIZE) for q, c in rows]
    num_blocks = sum(blocks_per_row) + 3  # + the null block and a couple never used
    block_ids = rng.permutation(np.arange(1, num_blocks))
    block_table = np.zeros((len(rows), max(blocks_per_row) + extra_cols), np.int32)
    slots = []
    used = 0
    for i, ((query_len, context_len), n) in enumerate(zip(rows, blocks_per_row, strict=True)):
        block_table[i, :n] = block_ids[used : used + n]
        used += n
        for pos in range(context_len, context_len + query_len):
            slots.append(int(block_table[i, pos // BLOCK_SIZE]) * BLOCK_SIZE + pos % BLOCK_SIZE)
    query_start_loc = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([q for q, _ in rows], out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)

    kv_cache = randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    kv_cache[:, 0] = 0
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        seq_lens=np.array([q + c for q, c in rows], np.int64),
        block_table=block_table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_size=BLOCK_SIZE,
    )
    return Batch(
        common,
        randn(num_tokens, num_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
        randn(num_tokens, num_kv_heads, head_dim),
        kv_cache,
    )


def reference(batch: Batch, scale: float, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_ref's output (computed in fp32) and its cache after the step (in the batch dtype);
    options: window, soft_cap, sinks."""
    ref = TorchRefBackend(batch.kv_cache.device)
    metadata = ref.build_metadata(batch.common)
    # torch_ref's cache is head-major: [2, blocks, kv_heads, block_size, d]
    cache = batch.kv_cache.transpose(2, 3).contiguous()
    ref.forward(batch.q, batch.k, batch.v, cache, metadata, scale, **options)
    cache32 = batch.kv_cache.float().transpose(2, 3).contiguous()
    q, k, v = batch.q.float(), batch.k.float(), batch.v.float()
    out = ref.forward(q, k, v, cache32, metadata, scale, **options)
    return out, cache.transpose(2, 3)


def run_triton(
    batch: Batch, scale: float, num_splits: int | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    backend = get_backend("triton", batch.kv_cache.device)
    metadata = backend.build_metadata(batch.common)
    if num_splits is not None:
        metadata = dataclasses.replace(metadata, num_splits=num_splits)
    cache = batch.kv_cache.clone()
    out = backend.forward(batch.q, batch.k, batch.v, cache, metadata, scale, **options)
    return out, cache


def check_against_reference(
    batch: Batch, num_splits: int | None = None, atol: float = 2e-4, **options
):
    scale = batch.q.shape[-1] ** -0.5
    ref_out, ref_cache = reference(batch, scale, **options)
    out, cache = run_triton(batch, scale, num_splits, **options)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    torch.testing.assert_close(out.float(), ref_out, atol=atol, rtol=atol)
    assert torch.equal(cache, ref_cache)


# ---- interpreter-sized (compiled on CUDA when there is a GPU) ---------------------------------
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(4, 2, 64), (8, 1, 64), (2, 2, 128), (4, 2, 128)],
    ids=["gqa4/2-d64", "gqa8/1-d64", "mha2-d128", "gqa4/2-d128"],
)
def test_mixed_batch_matches_torch_ref(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    check_against_reference(make_batch(MIXED_ROWS, num_heads, num_kv_heads, head_dim))


def test_prefill_only_batch_with_multiple_query_tiles() -> None:
    # 8 q heads per kv head -> 8 query tokens per tile, so each of these rows spans several tiles.
    check_against_reference(make_batch([(23, 0), (17, 9), (30, 48)], 8, 1, 64, seed=1))


def test_decode_only_batch() -> None:
    check_against_reference(make_batch(DECODE_ROWS, 4, 2, 64, seed=2))


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_decode(num_splits: int) -> None:
    # Short rows leave some splits empty; 5 is not a power of two (the reduce masks the pad).
    check_against_reference(make_batch(DECODE_ROWS, 4, 2, 64, seed=3), num_splits=num_splits)


def test_split_kv_in_mixed_batch_splits_only_decode_rows() -> None:
    check_against_reference(make_batch(MIXED_ROWS, 8, 1, 64, seed=4), num_splits=3)


@pytest.mark.parametrize(
    "options", [dict(window=7), dict(window=16), dict(soft_cap=0.8), dict(window=20, soft_cap=0.8)]
)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window_and_soft_cap(options, num_splits) -> None:
    # windows inside one tile and across tiles, split decode rows with splits before the window
    batch = make_batch(MIXED_ROWS, 4, 2, 64, seed=11)
    check_against_reference(batch, num_splits=num_splits, **options)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sinks(window, num_splits) -> None:
    # gpt-oss's sinks: counted once per row however its keys are split, beside a window
    batch = make_batch(MIXED_ROWS, 4, 2, 64, seed=12)
    sinks = torch.tensor([3.0, -2.0, 0.0, 1.5], device=batch.q.device)
    check_against_reference(batch, num_splits=num_splits, window=window, sinks=sinks)


def test_float16() -> None:
    # bfloat16 only on GPU: the interpreter multiplies bf16 bit patterns in tl.dot (triton#11584).
    batch = make_batch(MIXED_ROWS, 4, 2, 64, dtype=torch.float16, seed=5)
    check_against_reference(batch, atol=1e-2)
    check_against_reference(batch, num_splits=2, atol=1e-2)


def test_store_kv_skips_negative_slots() -> None:
    num_kv_heads, head_dim = 2, 64
    kv_cache = torch.zeros(2, 4, BLOCK_SIZE, num_kv_heads, head_dim, device=DEVICE)
    k = torch.randn(5, num_kv_heads, head_dim, device=DEVICE)
    v = torch.randn(5, num_kv_heads, head_dim, device=DEVICE)
    slot_mapping = torch.tensor([17, -1, 63, 16, -1], device=DEVICE)
    store_kv(k, v, kv_cache, slot_mapping)
    expected = torch.zeros_like(kv_cache)
    real = slot_mapping >= 0
    for i, (cache, src) in enumerate(((expected[0], k), (expected[1], v))):
        cache.view(-1, num_kv_heads, head_dim)[slot_mapping[real]] = src[real]
        assert torch.equal(kv_cache[i], expected[i])


def test_padding_tokens_are_left_alone() -> None:
    """A batch padded past query_start_loc[-1] (as a CUDA graph would) with the full padded block
    table: real tokens match the reference, padded output rows are not written."""
    batch = make_batch(DECODE_ROWS, 4, 2, 64, seed=6, extra_cols=5)
    scale = 0.125
    ref_out, _ = reference(batch, scale)
    num_pad = 3
    q = torch.cat([batch.q, torch.randn(num_pad, *batch.q.shape[1:], device=DEVICE)])
    k = torch.cat([batch.k, torch.randn(num_pad, *batch.k.shape[1:], device=DEVICE)])
    slot_mapping = torch.cat([batch.common.slot_mapping, torch.full((num_pad,), -1, device=DEVICE)])
    cache = batch.kv_cache.clone()
    store_kv(k, k, cache, slot_mapping)  # padding must not land anywhere, e.g. in the null block
    assert not cache[:, 0].any()

    def i32(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.astype(np.int32)).to(DEVICE)

    cache = batch.kv_cache.clone()
    store_kv(batch.k, batch.v, cache, batch.common.slot_mapping)
    out = torch.full_like(q, 7.0)
    for num_splits in (1, 2):
        paged_attention(
            q,
            cache,
            i32(batch.common.query_start_loc),
            i32(batch.common.seq_lens),
            i32(batch.common.block_table),
            scale,
            max_query_len=1,
            num_splits=num_splits,
            out=out,
        )
        torch.testing.assert_close(out[: batch.q.shape[0]], ref_out, atol=2e-4, rtol=2e-4)
        assert torch.all(out[batch.q.shape[0] :] == 7.0)


def test_choose_num_splits() -> None:
    def splits(rows: list[tuple[int, int]]) -> int:
        return choose_num_splits(np.array([q for q, _ in rows]), np.array([q + c for q, c in rows]))

    assert splits([(1, 100), (1, 900)]) == 1  # short contexts: off
    assert splits([(512, 4096)]) == 1  # no decode rows
    assert splits([(1, 4095), (64, 0)]) == 8  # by the longest decode context
    assert splits([(1, 1 << 20)]) == 16  # capped
    assert splits([(1, 8191)] * 256) == 4  # a big batch already fills the GPU


def test_metadata_is_on_device_and_trimmed() -> None:
    batch = make_batch(MIXED_ROWS, 4, 2, 64, extra_cols=7)
    metadata = TritonBackend(DEVICE).build_metadata(batch.common)
    assert metadata.block_table.shape == (len(MIXED_ROWS), -(-71 // BLOCK_SIZE))
    for t in (metadata.query_start_loc, metadata.seq_lens, metadata.block_table):
        assert t.dtype == torch.int32 and t.device.type == DEVICE.type
    assert metadata.max_query_len == 19 and metadata.num_splits == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        metadata.num_splits = 2  # type: ignore[misc]


def test_triton_loads_only_through_the_registry() -> None:
    code = (
        "import sys, lmserve, lmserve.attention, lmserve.attention.torch_ref, "
        "lmserve.layers.attention, lmserve.kernels\n"
        "assert 'triton' not in sys.modules, 'triton imported eagerly'\n"
        "import torch\n"
        "from lmserve.attention import get_backend\n"
        "get_backend('triton', torch.device('cpu'))\n"
        "assert 'triton' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


_COMPILE_FOR_SM90 = """
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from lmserve.kernels import paged_attention as pa

INT_PTRS = {"block_table_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_lens_ptr": "*i32",
            "slot_mapping_ptr": "*i64"}

def build(kernel, dtype, **constexprs):
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            if name.startswith("part_") or name == "sinks_ptr":
                return "*fp32"
            return INT_PTRS.get(name, "*" + dtype)
        return "fp32" if name == "scale_log2" else "i32"
    names = kernel.arg_names
    signature = {name: arg_type(name) for name in names}
    bound = {(names.index(k),): v for k, v in constexprs.items()}
    compile(ASTSource(kernel, signature, bound), target=GPUTarget("cuda", 90, 32))

build(pa._store_kv_kernel, "bf16", BLOCK_SIZE=16, BLOCK_D=128)
tile = dict(NUM_QUERIES_PER_KV=7, HEADS_PAD=8, BLOCK_N=64, BLOCK_D=128, BLOCK_SIZE=16)
build(pa._paged_attention_kernel, "bf16", BLOCK_Q=8, BLOCK_M=64, DOT_PRECISION="tf32",
      SOFT_CAP=0.0, HAS_SINKS=False, **tile)
build(pa._paged_attention_kernel, "fp32", BLOCK_Q=1, BLOCK_M=16, DOT_PRECISION="ieee",
      SOFT_CAP=50.0, HAS_SINKS=True, **tile)
build(pa._reduce_splits_kernel, "bf16", SPLITS_PAD=16, BLOCK_D=128)
"""


def test_kernels_compile_for_h100() -> None:
    """Without a GPU the interpreter never runs Triton's compiler, which rejects things the
    interpreter accepts (non-constexpr globals, loop-carried type changes, dot shapes); compile
    to an sm_90 cubin ahead of time (no driver needed) to catch those in CPU-only CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], check=True, env=env, timeout=300)


# ---- GPU: half precision, long contexts, CUDA graphs ------------------------------------------
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
LONG_MIXED_ROWS = [
    (1, 2047),
    (512, 0),
    (300, 1000),  # chunked prefill over a long cached prefix
    (1, 0),
    (77, 16),
    (1, 4000),
    (129, 3),
    (1, 333),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (16, 16, 64), (28, 4, 128)]
)
def test_gpu_long_mixed_batch(dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    batch = make_batch(LONG_MIXED_ROWS, num_heads, num_kv_heads, head_dim, dtype=dtype, seed=7)
    check_against_reference(batch, atol=2e-2)
    check_against_reference(batch, num_splits=8, atol=2e-2)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [*HALF, pytest.param(torch.float32, id="fp32")])
def test_gpu_decode_batch64_split_kv(dtype) -> None:
    rng = np.random.default_rng(8)
    rows = [(1, int(c)) for c in rng.integers(0, 4096, size=64)]
    rows[0] = (1, 8191)
    batch = make_batch(rows, 32, 8, 128, dtype=dtype, seed=8)
    metadata = TritonBackend(DEVICE).build_metadata(batch.common)
    assert metadata.num_splits > 1  # the heuristic engages on its own for these contexts
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    for num_splits in (None, 1, 16):
        check_against_reference(batch, num_splits=num_splits, atol=atol)


@gpu
@needs_gpu
def test_gpu_fp32_long_mixed_batch_is_tight() -> None:
    # fp32 dots run in IEEE precision (no silent tf32), so the error stays at fp32 rounding.
    check_against_reference(make_batch(LONG_MIXED_ROWS, 8, 2, 128, seed=9), atol=1e-4)


@gpu
@needs_gpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_gpu_decode_replays_in_a_cuda_graph(num_splits: int) -> None:
    """Capture store + attend for a decode batch, then refill its tensors in place with another
    batch of the same shapes (other lengths, block ids and values): launches depend only on
    shapes, so the replay must match the reference for the new batch."""
    num_heads, num_kv_heads, head_dim = 16, 4, 128
    # Same blocks per row (1, 44, 94, 2) in both steps, so every tensor keeps its shape.
    first = [(1, 5), (1, 700), (1, 1500), (1, 31)]
    second = [(1, 8), (1, 699), (1, 1490), (1, 20)]
    batch = make_batch(first, num_heads, num_kv_heads, head_dim, dtype=torch.bfloat16, seed=10)
    step = make_batch(second, num_heads, num_kv_heads, head_dim, dtype=torch.bfloat16, seed=11)
    backend = TritonBackend(DEVICE)
    metadata = dataclasses.replace(backend.build_metadata(batch.common), num_splits=num_splits)
    q, k, v, cache = (t.clone() for t in (batch.q, batch.k, batch.v, batch.kv_cache))
    scale = head_dim**-0.5
    backend.forward(q, k, v, cache, metadata, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, k, v, cache, metadata, scale)

    fresh = backend.build_metadata(step.common)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        getattr(metadata, name).copy_(getattr(fresh, name))
    for dst, src in ((q, step.q), (k, step.k), (v, step.v), (cache, step.kv_cache)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_cache = reference(step, scale)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    assert torch.equal(cache, ref_cache)


def test_engine_greedy_tokens_match_torch_ref(tiny_model_dirs) -> None:
    """The whole engine on the triton backend (interpreted here): a batch with chunked prefill,
    prefix-cache hits and decode gives the torch_ref backend's greedy tokens."""
    from lmserve import LLM, SamplingParams

    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 21, 21, 40)]
    params = SamplingParams(temperature=0, max_tokens=6)
    outputs = {}
    for backend in ("torch_ref", "triton"):
        llm = LLM(
            str(tiny_model_dirs["qwen3"]),
            attention_backend=backend,
            max_num_batched_tokens=32,
            num_kv_blocks=64,
            device=str(DEVICE),
            dtype="float32",
        )
        assert type(llm.engine_core.runner.backend).__name__.lower().startswith(backend[:5])
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs["triton"] == outputs["torch_ref"]
