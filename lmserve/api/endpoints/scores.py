"""vLLM's /classify, /score (and /v1/score) and /rerank (Jina's /v1/rerank, Cohere's
/v2/rerank)."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.pooling_protocol import ClassificationRequest, RerankRequest, ScoreRequest
from lmserve.api.replies import Reply


async def classify(servings: Servings, request: ClassificationRequest) -> Reply:
    return await servings.pooling.classify(request)


async def score(servings: Servings, request: ScoreRequest) -> Reply:
    return await servings.scores.score(request)


async def rerank(servings: Servings, request: RerankRequest) -> Reply:
    return await servings.scores.rerank(request)


ENDPOINTS = (
    Endpoint("classify", "/classify", ClassificationRequest, classify),
    Endpoint("score", "/score", ScoreRequest, score),
    Endpoint("score_v1", "/v1/score", ScoreRequest, score),
    Endpoint("rerank", "/rerank", RerankRequest, rerank),
    Endpoint("rerank_v1", "/v1/rerank", RerankRequest, rerank),
    Endpoint("rerank_v2", "/v2/rerank", RerankRequest, rerank),
)
