"""Token embedding tables built without their random initialization."""

from __future__ import annotations

import torch
from torch import nn


def uninitialized_embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """nn.Embedding whose table is left as allocated: every load fills it (checkpoint, dummy
    weights), and its own random init writes the whole table first (Gemma's 262k x 640: 671 MB
    made resident, ~1 s), even where a GGUF load then swaps it for the file's blocks."""
    return nn.Embedding(
        num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim)
    )
