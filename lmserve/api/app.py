"""The FastAPI app: routes, auth, CORS, error handlers, over one EngineClient."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.metadata
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from lmserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from lmserve.api.errors import APIError, error_response, install_error_handlers
from lmserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
)
from lmserve.api.responses_protocol import ResponsesRequest
from lmserve.api.serving import common
from lmserve.api.serving.chat import ChatServing, apply_chat_template
from lmserve.api.serving.completions import CompletionServing
from lmserve.api.serving.messages import MessagesServing, anthropic_error, anthropic_error_for
from lmserve.api.serving.models import model_card
from lmserve.api.serving.responses import ResponsesServing
from lmserve.engine.protocol import EngineClient

_VERSION = importlib.metadata.version("lmserve")


@dataclass(frozen=True)
class CORSConfig:
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool


def build_app(
    engine: EngineClient,
    config: common.ServingConfig,
    api_key: str | None = None,
    cors: CORSConfig | None = None,
    request_id_headers: bool = False,
    disable_docs: bool = False,
    root_path: str = "",
) -> FastAPI:
    docs = {} if not disable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="lmserve", version=_VERSION, root_path=root_path, **docs)
    install_error_handlers(app)
    if cors is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors.allowed_origins,
            allow_methods=cors.allowed_methods,
            allow_headers=cors.allowed_headers,
            allow_credentials=cors.allow_credentials,
        )
    if request_id_headers:
        _install_request_ids(app)
    if api_key:
        _install_auth(app, api_key)
    chat = ChatServing(engine, config)
    completions = CompletionServing(engine, config)
    messages = MessagesServing(engine, config, chat)
    responses = ResponsesServing(chat)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(request: ChatCompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, chat.create(request))

    @app.post("/v1/completions")
    async def create_completion(request: CompletionRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, completions.create(request))

    @app.post("/v1/responses")
    async def create_response(request: ResponsesRequest, raw: Request) -> Response:
        return await _unless_disconnected(raw, responses.create(request))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> Response:
        raise APIError(
            f"response {response_id!r} was not stored: this server keeps no responses",
            status=404,
            param="response_id",
        )

    @app.post("/v1/messages")
    @_anthropic_errors
    async def create_message(raw: Request) -> Response:
        request = MessagesRequest.model_validate(await _json_body(raw))
        return await _unless_disconnected(raw, messages.create(request))

    @app.post("/v1/messages/count_tokens")
    @_anthropic_errors
    async def count_message_tokens(raw: Request) -> Response:
        request = CountTokensRequest.model_validate(await _json_body(raw))
        return JSONResponse(messages.count_tokens(request))

    @app.post("/invocations")
    async def invocations(raw: Request) -> Response:
        """SageMaker's inference route (not behind the API key, as in vLLM): the body's shape
        picks the endpoint, chat completions first, then completions."""
        body = await _json_body(raw)
        try:
            request = ChatCompletionRequest.model_validate(body)
        except ValidationError:
            pass
        else:
            return await _unless_disconnected(raw, chat.create(request))
        try:
            prompt_request = CompletionRequest.model_validate(body)
        except ValidationError:
            raise APIError(
                "/invocations takes a chat completion request (with 'messages') or a completion "
                "request (with 'prompt'); this body is neither"
            ) from None
        return await _unless_disconnected(raw, completions.create(prompt_request))

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        names = [*config.served_model_names, *config.lora_modules.names()]
        return {"object": "list", "data": [_card(name) for name in names]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        common.check_model(config, model)
        return _card(model)

    def _card(name: str) -> dict[str, Any]:
        lora = config.lora_modules.get(name)
        return model_card(engine, name, lora, config.model_name)

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        _check_runtime_lora_updating()
        config.lora_modules.add(engine, request.lora_name, request.lora_path)
        return Response(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        _check_runtime_lora_updating()
        config.lora_modules.remove(request.lora_name)
        return Response(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    def _check_runtime_lora_updating() -> None:
        if not config.allow_runtime_lora_updating:
            raise APIError(
                "loading and unloading LoRA adapters at runtime is off; start the server with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (and --enable-lora)",
                status=404,
                code="not_found",
            )

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> dict[str, Any]:
        common.check_model(config, request.model)
        tokenizer = engine.tokenizer
        if tokenizer is None:
            raise APIError("this model has no tokenizer")
        if request.messages is not None:
            text = apply_chat_template(
                engine,
                request.messages,
                config.chat_template,
                request.add_generation_prompt,
                request.continue_final_message,
                request.chat_template_kwargs,
            )
            add_special = bool(request.add_special_tokens)
        elif request.prompt is not None:
            text, add_special = request.prompt, request.add_special_tokens is not False
        else:
            raise APIError("give either 'prompt' or 'messages'", param="prompt")
        ids = tokenizer.encode(text, add_special_tokens=add_special)
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": engine.config.scheduler.max_model_len,
            "tokens": ids,
        }
        if request.return_token_strs:
            body["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return body

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> dict[str, Any]:
        common.check_model(config, request.model)
        if engine.tokenizer is None:
            raise APIError("this model has no tokenizer")
        vocab = engine.config.model.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(request.tokens)}

    if config.server_dev_mode:
        _install_sleep_routes(app, engine)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return error_response("The engine is not running", 503)
        return Response(status_code=200)

    @app.get("/ping")
    async def ping() -> Response:
        return await health()

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _VERSION}

    @app.get("/load")
    async def load() -> dict[str, int]:
        stats = await engine.get_stats()
        return {"server_load": stats.num_running + stats.num_waiting}

    @app.get("/metrics")
    async def metrics() -> Response:
        await engine.get_stats()  # fresh gauges even when idle
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _unless_disconnected(
    raw: Request, work: Coroutine[Any, Any, dict[str, Any] | AsyncIterator[str]]
) -> Response:
    """Run a generation, cancelled (and so aborted in the engine) if the client goes away first:
    a non-streaming request would otherwise keep its KV blocks until it finished for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(raw))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        gone.cancel()
        return _respond(task.result())
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nobody reads it: the client closed the connection


async def _disconnected(raw: Request) -> None:
    """Returns once the client disconnects (the body was read already, so only that is left)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass


def _install_sleep_routes(app: FastAPI, engine: EngineClient) -> None:
    """Sleep mode's routes, served in dev mode only (VLLM_SERVER_DEV_MODE=1) as in vLLM."""

    @app.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        await engine.sleep(level)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(tags: Annotated[list[str] | None, Query()] = None) -> Response:
        if tags and set(tags) != {"weights", "kv_cache"}:
            raise APIError(
                f"waking only {', '.join(tags)} is not supported: the weights and the KV cache "
                "wake up together (omit tags)",
                param="tags",
            )
        await engine.wake_up()
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": engine.is_sleeping}


def _anthropic_errors(
    route: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """A route that answers in Anthropic's error body whatever the OpenAI routes would answer
    in theirs (the body is parsed inside, so bad JSON and fields are caught too)."""

    @functools.wraps(route)
    async def anthropic_route(raw: Request) -> Response:
        try:
            return await route(raw)
        except Exception as exc:
            response = anthropic_error_for(exc)
            if response is None:
                raise
            return response

    return anthropic_route


async def _json_body(raw: Request) -> Any:
    try:
        return await raw.json()
    except ValueError as exc:
        raise APIError(f"The request body is not valid JSON: {exc}") from None


def _respond(result: dict[str, Any] | AsyncIterator[str]) -> Response:
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(result, media_type="text/event-stream")


def _install_request_ids(app: FastAPI) -> None:
    @app.middleware("http")
    async def add_request_id(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
        return response


def _install_auth(app: FastAPI, api_key: str) -> None:
    """The key as OpenAI clients send it (Authorization: Bearer) or as Anthropic's do
    (x-api-key)."""
    bearer, key = f"Bearer {api_key}".encode(), api_key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if path.startswith("/v1/"):
            headers = request.headers
            if not (
                hmac.compare_digest(headers.get("authorization", "").encode(), bearer)
                or hmac.compare_digest(headers.get("x-api-key", "").encode(), key)
            ):
                if path.startswith("/v1/messages"):
                    return anthropic_error(401, "Invalid or missing API key")
                return error_response("Invalid or missing API key", 401, code="invalid_api_key")
        return await call_next(request)
