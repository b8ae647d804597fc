"""vLLM's /classify, /score and /rerank replies (the rerank one is Jina's and Cohere's shape)."""

from __future__ import annotations

from typing import Literal

import msgspec

from lmserve.api.schemas.embeddings import EmbeddingUsage


class ClassificationData(msgspec.Struct, kw_only=True):
    index: int
    label: str  # the most probable label's name (id2label)
    probs: list[float]
    num_classes: int


class ClassificationList(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: EmbeddingUsage


class ScoreData(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreList(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: EmbeddingUsage


class RerankedDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankResult(msgspec.Struct, kw_only=True):
    index: int  # the document's place in the request
    relevance_score: float
    document: RerankedDocument | None = None


class RerankList(msgspec.Struct, kw_only=True):
    id: str
    model: str
    usage: EmbeddingUsage
    results: list[RerankResult]  # most relevant first
