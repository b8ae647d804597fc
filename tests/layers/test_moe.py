"""The grouped expert path against a per-token reference, and HF's routing variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmserve.kernels import cpu_ops
from lmserve.layers.activation import silu_and_mul
from lmserve.layers.moe import FusedMoE, Routing, select_experts


def _per_token(moe: FusedMoE, x, weights, ids) -> torch.Tensor:
    """HF's arithmetic: each token alone through its experts, summed in ascending expert order."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        slots = sorted(range(ids.shape[1]), key=lambda s: int(ids[t, s]))
        for s in slots:
            e = int(ids[t, s])
            y = F.linear(silu_and_mul(F.linear(x[t : t + 1], moe.w13[e])), moe.w2[e])
            out[t] += (y * weights[t, s])[0]
    return out


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernel", "torch"])
@pytest.mark.parametrize("tokens", [1, 5, 64])
def test_grouped_experts_equal_each_token_alone(tokens: int, kernels: bool, monkeypatch) -> None:
    if kernels and not cpu_ops.available():
        pytest.skip("no C++ compiler")
    if not kernels:
        monkeypatch.setattr(cpu_ops, "usable", lambda x: False)
    torch.manual_seed(tokens)
    moe = FusedMoE(num_experts=8, hidden_size=32, intermediate_size=48)
    with torch.no_grad():
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
    x = torch.randn(tokens, 32)
    weights, ids = select_experts(torch.randn(tokens, 8), Routing(top_k=2, renormalize=True))
    got = moe(x, weights, ids)
    alone = torch.cat(
        [moe(x[t : t + 1], weights[t : t + 1], ids[t : t + 1]) for t in range(tokens)]
    )
    if kernels:  # a row's dot products do not depend on the rows beside it: bit for bit
        assert torch.equal(got, alone)
    # oneDNN runs several rows per expert as one GEMM, which rounds unlike one row: the last bits
    torch.testing.assert_close(got, alone, rtol=0, atol=2e-6)
    torch.testing.assert_close(got, _per_token(moe, x, weights, ids), rtol=0, atol=2e-6)


def test_routing_renormalizes_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = logits.softmax(-1)
    weights, ids = select_experts(logits, Routing(top_k=2, renormalize=False))
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = select_experts(logits, Routing(top_k=2, renormalize=True))
    torch.testing.assert_close(weights, probs[:, :2] / probs[:, :2].sum())
