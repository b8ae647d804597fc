"""POST /v1/completions."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.protocol import CompletionRequest
from lmserve.api.replies import Reply


async def create_completion(servings: Servings, request: CompletionRequest) -> Reply:
    return await servings.completions.create(request)


ENDPOINTS = (Endpoint("completions", "/v1/completions", CompletionRequest, create_completion),)
