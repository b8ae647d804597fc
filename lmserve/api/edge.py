"""The HTTP edge of the endpoint table: JSON bodies in, replies out as JSON or SSE.

Both servers mount the table through `mount`, each with its own way to answer (the single
server's engine, or the Ray ingress's handles), so parsing, error shapes, SSE encoding and
client disconnects behave the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lmserve.api import body, sse
from lmserve.api.endpoints import Endpoint
from lmserve.api.errors import APIError, error_reply
from lmserve.api.http_metrics import HTTPMetrics
from lmserve.api.json_response import json_response
from lmserve.api.replies import Reply, Whole
from lmserve.tracing.context import trace_context

Answer = Callable[[Endpoint, Any], Awaitable[Reply]]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeOptions:
    """How the edge answers: `sse_keep_alive_s` sends an SSE comment on a stream idle that
    long; a body over `max_body_mb` is a 413 before it is read whole; `metrics` counts the
    errors answered."""

    sse_keep_alive_s: float | None
    max_body_mb: float
    metrics: HTTPMetrics | None = None


def mount(
    app: FastAPI, endpoints: Iterable[Endpoint], answer: Answer, options: EdgeOptions
) -> None:
    """Each endpoint as a POST route answered by `answer`. The bodies are parsed here, not by
    FastAPI, so the request models are added to the app's OpenAPI document by hand."""
    schemas: dict[str, Any] = {}
    for endpoint in endpoints:
        route = _route(endpoint, answer, options)
        extra = None
        if endpoint.request is not None:
            name = endpoint.request.__name__
            schema = endpoint.request.model_json_schema(ref_template=_REF + "{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
            media = "multipart/form-data" if endpoint.form else "application/json"
            body = {"schema": {"$ref": _REF + name}}
            extra = {"requestBody": {"required": True, "content": {media: body}}}
        app.add_api_route(endpoint.path, route, methods=["POST"], openapi_extra=extra)
    _add_schemas(app, schemas)


_REF = "#/components/schemas/"


def _add_schemas(app: FastAPI, schemas: dict[str, Any]) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            components = build().setdefault("components", {}).setdefault("schemas", {})
            for name, schema in schemas.items():
                components.setdefault(name, schema)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _route(
    endpoint: Endpoint, answer: Answer, options: EdgeOptions
) -> Callable[[Request], Awaitable[Response]]:
    max_bytes = int(options.max_body_mb * 2**20)

    def failed(exc: Exception, raw: Request) -> Whole:
        """The last line of defence: a request's fault in the endpoint's error style, and a
        bug a 500 in it too, logged once with the request id (the client's X-Request-Id if
        it sent one); the connection stays usable."""
        reply = error_reply(exc, endpoint.errors)
        if reply is not None:
            return reply
        request_id = raw.headers.get("x-request-id") or uuid.uuid4().hex
        logger.error("request %s to %s failed", request_id, endpoint.path, exc_info=exc)
        message = f"Internal error: {type(exc).__name__} (request {request_id})"
        reply = error_reply(APIError(message, status=500), endpoint.errors)
        assert reply is not None
        return reply

    def counted(reply: Whole) -> Whole:
        if reply.status >= 400 and options.metrics is not None:
            options.metrics.record_error(reply.status, endpoint.path)
        return reply

    async def route(raw: Request) -> Response:
        try:
            data = await _read_body(raw, max_bytes)
            if endpoint.form:
                parsed = await body.parse_form(raw.headers.get("content-type", ""), data)
            else:
                parsed = body.parse(data)
            with trace_context(raw.headers):  # a client's traceparent, for the engine's span
                reply = await _unless_disconnected(raw, answer(endpoint, parsed))
        except Exception as exc:
            reply = failed(exc, raw)
        if reply is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        if isinstance(reply, Whole):
            reply = counted(reply)
            if isinstance(reply.body, str):
                return Response(reply.body, reply.status, reply.headers, reply.media_type)
            return json_response(reply.body, reply.status, reply.headers)

        def on_error(exc: Exception) -> Whole:
            return counted(failed(exc, raw))

        lines = sse.lines(reply, options.sse_keep_alive_s, on_error)
        return StreamingResponse(lines, media_type="text/event-stream")

    route.__name__ = endpoint.name
    return route


async def _read_body(raw: Request, max_bytes: int) -> bytes:
    """The body, refused with a 413 once it is known to be over `max_bytes` (by its
    Content-Length, or while it arrives)."""
    too_large = APIError(
        f"The request body is larger than {max_bytes / 2**20:g} MB "
        "(--max-request-body-mb): send less, or start the server with a larger limit",
        status=413,
    )
    length = raw.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in raw.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _unless_disconnected(raw: Request, work: Awaitable[Reply]) -> Reply | None:
    """Run a request, cancelled (and so aborted in the engine) if the client goes away first,
    then None: a non-streaming request would otherwise keep its KV blocks until it finished
    for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(raw))
    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        gone.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


async def _disconnected(raw: Request) -> None:
    """Returns once the client disconnects (the body was read already, so only that is left)."""
    while (await raw.receive())["type"] != "http.disconnect":
        pass
