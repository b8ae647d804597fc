"""Anthropic's POST /v1/messages and /v1/messages/count_tokens, answering errors in Anthropic's
shape."""

from __future__ import annotations

from lmserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.replies import Reply


async def create_message(servings: Servings, request: MessagesRequest) -> Reply:
    return await servings.messages.create(request)


async def count_message_tokens(servings: Servings, request: CountTokensRequest) -> Reply:
    return await servings.messages.count_tokens(request)


ENDPOINTS = (
    Endpoint("messages", "/v1/messages", MessagesRequest, create_message, "anthropic"),
    Endpoint(
        "count_tokens",
        "/v1/messages/count_tokens",
        CountTokensRequest,
        count_message_tokens,
        "anthropic",
        generates=False,
    ),
)
