"""POST /tokenize and /detokenize: a prompt or chat as the model's token ids, and back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.errors import APIError
from lmserve.api.protocol import DetokenizeRequest, TokenizeRequest, tool_dicts
from lmserve.api.replies import Reply, Whole
from lmserve.api.schemas.tokenize import DetokenizeResponse, TokenizeResponse
from lmserve.api.serving import common
from lmserve.api.serving.chat import apply_chat_template


async def tokenize(servings: Servings, request: TokenizeRequest) -> Reply:
    engine, config = servings.engine, servings.config
    common.check_model(config, request.model)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise APIError("this model has no tokenizer")
    if request.messages is not None:
        text = await apply_chat_template(
            engine,
            config,
            request.messages,
            None,
            request.add_generation_prompt,
            request.continue_final_message,
            request.chat_template_kwargs,
            tool_dicts(request.tools),
        )
        add_special = bool(request.add_special_tokens)
    elif request.prompt is not None:
        text, add_special = request.prompt, request.add_special_tokens is not False
    else:
        raise APIError("give either 'prompt' or 'messages'", param="prompt")
    ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special)
    body = TokenizeResponse(
        count=len(ids), max_model_len=engine.config.scheduler.max_model_len, tokens=ids
    )
    if request.return_token_strs:
        body.token_strs = tokenizer.convert_ids_to_tokens(ids)
    return Whole(body)


async def detokenize(servings: Servings, request: DetokenizeRequest) -> Reply:
    engine = servings.engine
    common.check_model(servings.config, request.model)
    if engine.tokenizer is None:
        raise APIError("this model has no tokenizer")
    vocab = engine.config.model.vocab_size
    if any(not 0 <= t < vocab for t in request.tokens):
        raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
    return Whole(DetokenizeResponse(prompt=engine.tokenizer.decode(request.tokens)))


ENDPOINTS = (
    Endpoint("tokenize", "/tokenize", TokenizeRequest, tokenize, generates=False),
    Endpoint("detokenize", "/detokenize", DetokenizeRequest, detokenize, generates=False),
)


def tokenizer_info_routes(servings: Servings) -> APIRouter:
    """GET /tokenizer_info (vLLM's, with --enable-tokenizer-info-endpoint): the tokenizer's
    class, its settings and the chat template the server renders with, for clients that
    tokenize on their side."""
    router = APIRouter()

    @router.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        tokenizer = servings.engine.tokenizer
        if tokenizer is None:
            raise APIError("this model has no tokenizer", status=404)
        # its settings as JSON: special tokens (AddedToken objects) by their text
        info = json.loads(json.dumps(tokenizer.init_kwargs, default=str))
        template = servings.config.chat_template or getattr(tokenizer, "chat_template", None)
        return {**info, "tokenizer_class": type(tokenizer).__name__, "chat_template": template}

    return router
