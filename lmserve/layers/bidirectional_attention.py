"""Full (unmasked) self-attention over fixed-size inputs: the audio and vision encoders' layers
(Whisper's 1,500 frames, CLIP's patches), which see every position and keep no KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BidirectionalAttention(nn.Module):
    """q/k/v/out projections under HF's names (`k_bias=False`: Whisper's key has none)."""

    def __init__(self, hidden: int, num_heads: int, k_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden, bias=k_bias)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] -> [batch, tokens, hidden]."""
        batch, tokens, _ = x.shape
        q, k, v = (
            proj(x).view(batch, tokens, self.num_heads, -1).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        return self.out_proj(out)
