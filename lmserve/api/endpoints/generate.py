"""POST /inference/v1/generate: tokens in, tokens out."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.generate_protocol import GenerateRequest
from lmserve.api.replies import Reply


async def generate_tokens(servings: Servings, request: GenerateRequest) -> Reply:
    return await servings.generate.create(request)


ENDPOINTS = (Endpoint("generate", "/inference/v1/generate", GenerateRequest, generate_tokens),)
