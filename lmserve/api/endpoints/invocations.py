"""POST /invocations: SageMaker's inference route. The body's shape picks the endpoint, as in
vLLM (not behind the API key): on a generative model chat completions first, then
completions; on a pooling model rerank (query, documents), score (text_1, text_2), then the
embeddings or classification request its task serves."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.errors import APIError
from lmserve.api.pooling_protocol import (
    ClassificationRequest,
    EmbeddingRequest,
    RerankRequest,
    ScoreRequest,
)
from lmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.api.replies import Reply


async def invoke(servings: Servings, body: Any) -> Reply:
    pooler = servings.engine.config.pooler
    if pooler is not None:
        return await _invoke_pooling(servings, body, pooler.task)
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


async def _invoke_pooling(servings: Servings, body: Any, task: str) -> Reply:
    for kind in (RerankRequest, ScoreRequest):
        try:
            request = kind.model_validate(body)
        except ValidationError:
            continue
        if isinstance(request, RerankRequest):
            return await servings.scores.rerank(request)
        return await servings.scores.score(request)
    if task == "classify":
        return await servings.pooling.classify(ClassificationRequest.model_validate(body))
    return await servings.pooling.embeddings(EmbeddingRequest.model_validate(body))


ENDPOINTS = (Endpoint("invocations", "/invocations", None, invoke),)
