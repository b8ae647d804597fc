"""POST /v1/chat/completions."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.protocol import ChatCompletionRequest
from lmserve.api.replies import Reply


async def create_chat_completion(servings: Servings, request: ChatCompletionRequest) -> Reply:
    return await servings.chat.create(request)


ENDPOINTS = (
    Endpoint("chat", "/v1/chat/completions", ChatCompletionRequest, create_chat_completion),
)
