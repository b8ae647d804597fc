"""The grouped expert path against a per-token reference, and HF's routing variants."""

from __future__ import annotations

import pytest
import torch

from lmserve.layers.activation import silu_and_mul
from lmserve.layers.moe import FusedMoE, Routing, select_experts


def _per_token(moe: FusedMoE, x, weights, ids) -> torch.Tensor:
    """Each token alone through its experts, summed in ascending expert order."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        slots = sorted(range(ids.shape[1]), key=lambda s: int(ids[t, s]))
        for s in slots:
            e = int(ids[t, s])
            y = silu_and_mul(x[t : t + 1] @ moe.w13[e]) @ moe.w2[e]
            out[t] += (y * weights[t, s])[0]
    return out


@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_grouped_experts_equal_each_token_alone(tokens: int) -> None:
    torch.manual_seed(tokens)
    moe = FusedMoE(num_experts=8, hidden_size=32, intermediate_size=48)
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    x = torch.randn(tokens, 32)
    weights, ids = select_experts(torch.randn(tokens, 8), Routing(top_k=2, renormalize=True))
    got = moe(x, weights, ids)
    expected = _per_token(moe, x, weights, ids)
    if tokens == 1:  # the same GEMVs in the same order: bit for bit
        assert torch.equal(got, expected)
    # several rows per expert run as one GEMM, which rounds unlike row-by-row GEMVs (a dense
    # layer batched does the same): the last bits only
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_routing_renormalizes_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = logits.softmax(-1)
    weights, ids = select_experts(logits, Routing(top_k=2, renormalize=False))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = select_experts(logits, Routing(top_k=2, renormalize=True))
    torch.testing.assert_close(weights, probs[:, :2] / probs[:, :2].sum())
