"""Applying a step's grammar bitmask to the logits, in the worker.

xgrammar's CPU `apply_token_bitmask_inplace` and a bool `masked_fill_` both cost ~2 ms for 16 rows
of a 49k vocabulary here. Looking each mask byte up in a 256 x 8 table of {0, -inf} and adding
the result to the constrained rows in place costs ~0.3 ms.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from lmserve.transfer import to_device


@functools.cache
def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return torch.tensor(np.where(bits, 0.0, -np.inf), dtype=dtype, device=device)  # [256, 8]


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: np.ndarray, rows: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place, on `rows` of `logits` only."""
    vocab = logits.shape[1]
    table = _byte_table(logits.device, logits.dtype)
    mask_bytes = to_device(bitmask, logits.device).view(torch.uint8).long()
    additive = torch.nn.functional.embedding(mask_bytes, table).view(len(rows), -1)  # [G, 32W]
    if additive.shape[1] > vocab:
        additive = additive[:, :vocab]
    elif additive.shape[1] < vocab:  # a model vocabulary padded past the tokenizer's
        pad = additive.new_full((len(rows), vocab - additive.shape[1]), float("-inf"))
        additive = torch.cat([additive, pad], dim=1)
    logits.index_add_(0, rows, additive)
