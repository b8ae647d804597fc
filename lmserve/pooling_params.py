"""What a pooling request asks of the pooler (vLLM's PoolingParams)."""

from __future__ import annotations

import msgspec


class PoolingParams(msgspec.Struct, frozen=True, kw_only=True):
    """`dimensions` keeps the first N dimensions (Matryoshka), then renormalizes; `normalize`
    (embeddings) and `activation` (classifiers: probabilities, or raw logits) None take the
    model's pooler default."""

    dimensions: int | None = None
    normalize: bool | None = None
    activation: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
