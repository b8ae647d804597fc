"""POST /v1/embeddings."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.pooling_protocol import EmbeddingRequest
from lmserve.api.replies import Reply


async def create_embedding(servings: Servings, request: EmbeddingRequest) -> Reply:
    return await servings.embeddings.create(request)


ENDPOINTS = (Endpoint("embeddings", "/v1/embeddings", EmbeddingRequest, create_embedding),)
