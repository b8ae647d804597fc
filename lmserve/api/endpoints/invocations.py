"""POST /invocations: SageMaker's inference route. The body's shape picks the endpoint, chat
completions first, then completions (as in vLLM; not behind the API key)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.errors import APIError
from lmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.api.replies import Reply


async def invoke(servings: Servings, body: Any) -> Reply:
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError:
        pass
    else:
        return await servings.chat.create(request)
    try:
        prompt_request = CompletionRequest.model_validate(body)
    except ValidationError:
        raise APIError(
            "/invocations takes a chat completion request (with 'messages') or a completion "
            "request (with 'prompt'); this body is neither"
        ) from None
    return await servings.completions.create(prompt_request)


ENDPOINTS = (Endpoint("invocations", "/invocations", None, invoke),)
