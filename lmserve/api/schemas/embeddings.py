"""POST /v1/embeddings and /pooling: lists of embeddings (or raw pooler outputs), each floats
or base64 float32 bytes."""

from __future__ import annotations

from typing import Literal

import msgspec


class Embedding(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format=base64


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class PoolingData(msgspec.Struct, kw_only=True):
    """vLLM's /pooling item: the pooler's output as nested lists, or base64 float32 bytes."""

    index: int
    object: Literal["pooling"] = "pooling"
    data: list[float] | list[list[float]] | str


class PoolingList(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[PoolingData]
    usage: EmbeddingUsage
