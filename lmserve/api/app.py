"""`lmserve serve`'s FastAPI app: the endpoint table and the server-level routes over one
engine, with auth, CORS, request ids and error handlers. Composition only: endpoints live in
`api/endpoints/`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmserve.api import edge
from lmserve.api.auth import install_auth
from lmserve.api.endpoints import (
    ENDPOINTS,
    Servings,
    dev,
    health,
    lora,
    models,
    playground,
    responses,
    tokenize,
)
from lmserve.api.errors import install_error_handlers
from lmserve.api.http_metrics import HTTPMetrics
from lmserve.api.serving.common import ServingConfig
from lmserve.engine.protocol import EngineClient


@dataclass(frozen=True)
class CORSConfig:
    allowed_origins: list[str]
    allowed_methods: list[str]
    allowed_headers: list[str]
    allow_credentials: bool


def build_app(
    engine: EngineClient,
    config: ServingConfig,
    api_keys: Sequence[str] = (),
    cors: CORSConfig | None = None,
    request_id_headers: bool = False,
    disable_docs: bool = False,
    root_path: str = "",
) -> FastAPI:
    docs = {} if not disable_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="lmserve", version=health.VERSION, root_path=root_path, **docs)
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
    if api_keys:
        install_auth(app, api_keys)
    _install_load_report(app, engine)
    servings = Servings(engine, config)
    http_metrics = HTTPMetrics()
    options = edge.EdgeOptions(
        config.sse_keep_alive_interval, config.max_request_body_mb, http_metrics
    )
    edge.mount(app, ENDPOINTS, servings.answer, options)
    app.include_router(responses.routes())
    app.include_router(models.routes(engine, config))
    app.include_router(lora.routes(engine, config))
    if config.enable_tokenizer_info_endpoint:
        app.include_router(tokenize.tokenizer_info_routes(servings))
    if config.server_dev_mode:
        app.include_router(dev.routes(engine))
    app.include_router(health.routes(engine, http_metrics))
    app.include_router(health.version_routes())
    if config.enable_playground:
        app.include_router(playground.routes())
    return app


def _install_request_ids(app: FastAPI) -> None:
    @app.middleware("http")
    async def add_request_id(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Request-Id"] = request.headers.get("x-request-id") or uuid.uuid4().hex
        return response


def _install_load_report(app: FastAPI, engine: EngineClient) -> None:
    """vLLM's ORCA load report: a request that sends `endpoint-load-metrics-format: TEXT` (or
    JSON) gets the engine's load back in an `endpoint-load-metrics` header, which load
    balancers (Envoy, the Gateway API inference extension) route by. Plain ASGI, so streams
    and disconnects pass through untouched."""

    def header(fmt: str) -> bytes:
        load = engine.metrics.load_report()
        if fmt == "TEXT":
            return ("TEXT " + ", ".join(f"named_metrics.{k}={v}" for k, v in load.items())).encode()
        return ("JSON " + json.dumps({"named_metrics": load})).encode()

    def middleware(inner: ASGIApp) -> ASGIApp:
        async def app_with_report(scope: Scope, receive: Receive, send: Send) -> None:
            fmt = ""
            if scope["type"] == "http":
                for key, value in scope["headers"]:
                    if key == b"endpoint-load-metrics-format":
                        fmt = value.decode("latin-1").strip().upper()
            if fmt not in ("TEXT", "JSON"):
                return await inner(scope, receive, send)

            async def send_with_report(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", []), (b"endpoint-load-metrics", header(fmt))]
                    message = {**message, "headers": headers}
                await send(message)

            await inner(scope, receive, send_with_report)

        return app_with_report

    app.add_middleware(middleware)  # type: ignore[arg-type]
