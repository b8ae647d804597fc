"""Packed attention equals attention over each prompt alone, however prompts are grouped."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.layers.packed_attention import PackedLayout, packed_attention


def _alone(q, k, v, seq_lens, causal, window=None):
    outs = []
    for qq, kk, vv in zip(*(t.split(seq_lens) for t in (q, k, v)), strict=True):
        groups = qq.shape[1] // kk.shape[1]
        kk, vv = (t.repeat_interleave(groups, dim=1) for t in (kk, vv))
        mask = None
        if window is not None:  # query i sees keys i - window + 1 .. i
            n = qq.shape[0]
            mask = torch.ones(n, n, dtype=torch.bool).tril_().triu_(1 - window)
        out = F.scaled_dot_product_attention(
            *(t.transpose(0, 1) for t in (qq, kk, vv)),
            attn_mask=mask,
            is_causal=causal and mask is None,
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize(
    "seq_lens",
    [
        [7],
        [9, 9, 8, 8],
        [40, 39, 12, 11, 3, 1],
        [5, 30, 2],
    ],  # one; one padded group; several; unsorted
)
def test_equals_each_prompt_alone(seq_lens, kv_heads, causal):
    torch.manual_seed(0)
    tokens = sum(seq_lens)
    q = torch.randn(tokens, 4, 16)
    k, v = torch.randn(tokens, kv_heads, 16), torch.randn(tokens, kv_heads, 16)
    layout = PackedLayout(seq_lens, q.device)
    got = packed_attention(q, k, v, layout, causal=causal)
    torch.testing.assert_close(got, _alone(q, k, v, seq_lens, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_lens", [[20], [9, 9, 8, 8], [40, 39, 12, 11, 3, 1]])
def test_a_sliding_window_equals_each_prompt_alone(seq_lens):
    torch.manual_seed(1)
    tokens = sum(seq_lens)
    q, k, v = torch.randn(tokens, 4, 16), torch.randn(tokens, 2, 16), torch.randn(tokens, 2, 16)
    layout = PackedLayout(seq_lens, q.device)
    got = packed_attention(q, k, v, layout, causal=True, window=6)
    expected = _alone(q, k, v, seq_lens, True, window=6)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_groups_bound_padding():
    layout = PackedLayout([40, 39, 12, 11, 3, 1], torch.device("cpu"))
    assert [g.seq_lens for g in layout.groups] == [[40, 39], [12, 11], [3], [1]]
    assert layout.groups[2].valid is None  # alone: no padding, no mask
