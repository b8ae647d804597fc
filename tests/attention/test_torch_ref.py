"""The torch reference backend against attention written out row by row, for each of its paths:
decode blocks read in place or gathered (shared prefix blocks included), a lone decode row, and
prefill chunks gathered a slice of rows at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve import LLM
from lmserve.attention import torch_ref
from lmserve.attention.backend import CommonAttentionMetadata
from lmserve.attention.torch_ref import TorchRefBackend
from tests.engine.test_llm import random_prompts, run_greedy

BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 8


def make_batch(
    rows: list[tuple[int, int]],
    tables: list[list[int]],
    num_blocks: int,
    seed: int = 0,
    *,
    block_size: int = BLOCK_SIZE,
    heads: int = NUM_HEADS,
    kv_heads: int = NUM_KV_HEADS,
    head_dim: int = HEAD_DIM,
):
    """rows: (query_len, context_len) each, with its block ids in `tables`. Returns (common,
    cache, q, k, v); q and k are views into one [tokens, heads + kv_heads, d] tensor, as the
    model hands them over after rotating them together."""
    gen = torch.Generator().manual_seed(seed)
    width = max(map(len, tables))
    block_table = np.zeros((len(rows), width), np.int32)
    for i, ids in enumerate(tables):
        block_table[i, : len(ids)] = ids
    slots = [
        block_table[i, pos // block_size] * block_size + pos % block_size
        for i, (query_len, context_len) in enumerate(rows)
        for pos in range(context_len, context_len + query_len)
    ]
    query_start_loc = np.concatenate([[0], np.cumsum([q for q, _ in rows])])
    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        seq_lens=np.array([q + c for q, c in rows]),
        block_table=block_table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_size=block_size,
    )
    num_tokens = int(query_start_loc[-1])
    cache = torch.randn(2, num_blocks, kv_heads, block_size, head_dim, generator=gen)
    cache[:, 0] = 0
    qk = torch.randn(num_tokens, heads + kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=gen)
    return common, cache, qk[:, :heads], qk[:, heads:], v


def _row_by_row(common, cache, q, scale, window=None, soft_cap=None, sinks=None) -> torch.Tensor:
    """Each token attends its row's keys up to its own position (its last `window` of them),
    scores capped by soft_cap * tanh(s / soft_cap), a head's sink one more score whose value is
    zero; cache already holds this step."""
    out = torch.empty_like(q)
    group = NUM_HEADS // NUM_KV_HEADS
    for i, seq_len in enumerate(common.seq_lens.tolist()):
        start, end = common.query_start_loc[i], common.query_start_loc[i + 1]
        blocks = torch.from_numpy(common.block_table[i].astype(np.int64))
        keys, values = (
            c[blocks].transpose(0, 1).reshape(NUM_KV_HEADS, -1, HEAD_DIM)[:, :seq_len]
            for c in cache
        )
        for t in range(start, end):
            visible = seq_len - (end - t) + 1
            first = 0 if window is None else max(0, visible - window)
            for h in range(NUM_HEADS):
                kv = h // group
                scores = keys[kv, first:visible] @ q[t, h] * scale
                if soft_cap is not None:
                    scores = soft_cap * torch.tanh(scores / soft_cap)
                if sinks is not None:
                    scores = torch.cat([scores, sinks[h : h + 1]])
                    values_h = torch.cat([values[kv, first:visible], torch.zeros(1, HEAD_DIM)])
                else:
                    values_h = values[kv, first:visible]
                out[t, h] = torch.softmax(scores, dim=0) @ values_h
    return out


def _check(
    common, cache, q, k, v, window=None, soft_cap=None, sinks=None
) -> torch_ref.TorchRefMetadata:
    backend = TorchRefBackend(torch.device("cpu"))
    metadata = backend.build_metadata(common)
    options = dict(window=window, soft_cap=soft_cap, sinks=sinks)
    out = backend.forward(q, k, v, cache, metadata, 0.3, **options)
    slots = common.slot_mapping
    stored_k = cache[0][slots // BLOCK_SIZE, :, slots % BLOCK_SIZE]
    assert torch.equal(stored_k, k)
    expected = _row_by_row(common, cache, q, 0.3, window, soft_cap, sinks)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    return metadata


def test_decode_blocks_in_a_compact_span_are_read_in_place() -> None:
    # three decode rows, blocks 1..7 shuffled between them, block 5 unused inside the span
    rows = [(1, 6), (1, 8), (1, 3)]
    metadata = _check(*make_batch(rows, [[3, 7], [2, 6, 4], [1]], num_blocks=9))
    assert metadata.decode is not None and metadata.decode.span == (1, 8)


def test_scattered_decode_blocks_are_gathered() -> None:
    rows = [(1, 5), (1, 2)]
    metadata = _check(*make_batch(rows, [[40, 3], [22]], num_blocks=48))
    assert metadata.decode is not None and metadata.decode.span is None


def test_a_prefix_block_shared_by_decode_rows_is_gathered_for_each() -> None:
    rows = [(1, 6), (1, 5), (1, 4)]
    metadata = _check(*make_batch(rows, [[1, 2], [1, 3], [1, 4]], num_blocks=5))
    assert metadata.decode is not None and metadata.decode.span is None


def test_decode_rows_beside_prefill_chunks() -> None:
    # decode, chunk with context, decode, first chunk (causal)
    rows = [(1, 9), (5, 3), (1, 2), (6, 0)]
    tables = [[5, 6, 7], [1, 2], [8], [3, 4]]
    metadata = _check(*make_batch(rows, tables, num_blocks=9))
    assert metadata.decode is not None and not metadata.decode.covers_batch
    assert len(metadata.groups) == 1


@pytest.mark.parametrize("rows", [[(1, 10)], [(7, 0)]], ids=["decode", "prefill"])
def test_a_lone_row_goes_through_sdpa_unmasked(rows) -> None:
    metadata = _check(*make_batch(rows, [[2, 1, 3]], num_blocks=4))
    assert metadata.decode is None and metadata.groups[0].mask is None


def test_prefill_rows_gathered_one_per_slice(monkeypatch) -> None:
    monkeypatch.setattr(torch_ref, "_GATHER_BYTES", 1)
    rows = [(3, 5), (6, 0), (2, 1)]
    _check(*make_batch(rows, [[4, 2], [1, 3], [5]], num_blocks=6))


# windows shorter than some rows' contexts, a window of one key, soft-capped scores, and sinks
# (large ones take most of the weight; with a window of one key the sink still competes)
SINKS = torch.tensor([2.0, -1.0, 0.5, 4.0, -3.0, 0.0])
WINDOWED = [
    (3, None, None),
    (6, None, None),
    (1, None, None),
    (None, 0.5, None),
    (5, 0.5, None),
    (None, None, SINKS),
    (1, None, SINKS),
    (4, None, SINKS),
]


@pytest.mark.parametrize(("window", "soft_cap", "sinks"), WINDOWED)
def test_sliding_window_soft_cap_and_sinks_on_every_path(window, soft_cap, sinks) -> None:
    # decode blocks in place, gathered (a shared prefix block), beside chunks, a lone row
    layouts = [
        ([(1, 6), (1, 8), (1, 3)], [[3, 7], [2, 6, 4], [1]], 9),
        ([(1, 6), (1, 5), (1, 4)], [[1, 2], [1, 3], [1, 4]], 5),
        ([(1, 9), (5, 3), (1, 2), (6, 0)], [[5, 6, 7], [1, 2], [8], [3, 4]], 9),
        ([(1, 10)], [[2, 1, 3]], 4),
        ([(7, 0)], [[2, 1]], 3),
    ]
    for rows, tables, num_blocks in layouts:
        _check(*make_batch(rows, tables, num_blocks), window=window, soft_cap=soft_cap, sinks=sinks)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_one_row_per_gather_gives_the_same_tokens(tiny_model_dirs, monkeypatch, kind) -> None:
    path = str(tiny_model_dirs[kind])
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    kwargs = dict(  # mixed decode + chunks
        kv_cache_memory_gb=0.01, max_num_batched_tokens=24, attention_backend="torch_ref"
    )
    whole = run_greedy(LLM(path, **kwargs), prompts)
    monkeypatch.setattr(torch_ref, "_GATHER_BYTES", 1)  # every slice is one row
    monkeypatch.setattr(torch_ref, "_MAX_SPAN_RATIO", 0.0)  # decode blocks gathered too
    assert run_greedy(LLM(path, **kwargs), prompts) == whole
