"""Encoder K/V in KV blocks: stored and read back whatever the backend's block layout and
whether a request's blocks are consecutive (read in place) or scattered (gathered), and
attention over them equal to SDPA on the states themselves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.layers.cross_attention import (
    CrossBlocks,
    CrossLayout,
    cross_attention,
    read_cross,
    store_cross,
)

HEADS, HEAD_DIM, BLOCK, STATES = 2, 8, 4, 10  # 10 states fill 3 blocks of 4, the last in part


@pytest.mark.parametrize("head_major", [True, False])
def test_store_read_and_attend(head_major: bool) -> None:
    torch.manual_seed(0)
    shape = (2, 16, HEADS, BLOCK, HEAD_DIM) if head_major else (2, 16, BLOCK, HEADS, HEAD_DIM)
    cache = torch.zeros(shape)
    scattered = CrossBlocks.of([9, 2, 5], STATES, torch.device("cpu"))
    consecutive = CrossBlocks.of([11, 12, 13], STATES, torch.device("cpu"))
    assert scattered.span is None and consecutive.span == (11, 14)
    states = {}
    for blocks in (scattered, consecutive):
        k, v = torch.randn(STATES, HEADS, HEAD_DIM), torch.randn(STATES, HEADS, HEAD_DIM)
        store_cross(cache, k, v, blocks)
        states[blocks.span] = (k, v)
        got_k, got_v = read_cross(cache, blocks, HEADS, HEAD_DIM)
        assert torch.equal(got_k, k.transpose(0, 1)) and torch.equal(got_v, v.transpose(0, 1))
    assert cache[:, [0, 1, 3, 4, 6, 7, 8, 10, 14, 15]].abs().sum() == 0  # no other block written
    q = torch.randn(5, HEADS, HEAD_DIM)  # row 0: tokens 0-2 (scattered), row 1: 3-4
    layout = CrossLayout([(0, 3, scattered), (3, 5, consecutive)])
    out = cross_attention(q, cache, layout, scale=0.3)
    for (start, end), blocks in (((0, 3), scattered), ((3, 5), consecutive)):
        k, v = states[blocks.span]
        expected = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.3
        ).transpose(0, 1)
        assert torch.allclose(out[start:end], expected, atol=1e-6)
