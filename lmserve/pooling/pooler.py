"""Packed hidden states to one output per prompt: MEAN, CLS, LAST or ALL, then normalized."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmserve.pooling.config import PoolerConfig


def pool(hidden: torch.Tensor, seq_lens: list[int], config: PoolerConfig) -> list[torch.Tensor]:
    """`hidden` is [tokens, H] with the prompts back to back, `seq_lens` long each. MEAN
    averages all of a prompt's tokens (sentence-transformers' mean over its attention mask),
    CLS takes its first, LAST its last, ALL keeps every token's row."""
    pieces = torch.split(hidden, seq_lens)
    if config.pooling_type == "ALL":
        pooled = list(pieces)
    else:
        reduce = {
            "MEAN": lambda x: x.mean(dim=0),
            "CLS": lambda x: x[0],
            "LAST": lambda x: x[-1],
        }[config.pooling_type]
        pooled = [reduce(x) for x in pieces]
    if config.normalize:
        pooled = [F.normalize(x, p=2, dim=-1) for x in pooled]
    return pooled
