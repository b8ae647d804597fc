"""POST /v1/embeddings and vLLM's /pooling."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.pooling_protocol import EmbeddingRequest, PoolingRequest
from lmserve.api.replies import Reply


async def create_embedding(servings: Servings, request: EmbeddingRequest) -> Reply:
    return await servings.pooling.embeddings(request)


async def create_pooling(servings: Servings, request: PoolingRequest) -> Reply:
    return await servings.pooling.pooling(request)


ENDPOINTS = (
    Endpoint("embeddings", "/v1/embeddings", EmbeddingRequest, create_embedding),
    Endpoint("pooling", "/pooling", PoolingRequest, create_pooling),
)
