"""The HTTP edge of the endpoint table: JSON bodies in, replies out as JSON or SSE.

Both servers mount the table through `mount`, each with its own way to answer (the single
server's engine, or the Ray ingress's handles), so parsing, error shapes, SSE encoding and
client disconnects behave the same on both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from lmserve.api import sse
from lmserve.api.endpoints import Endpoint
from lmserve.api.errors import APIError, error_reply
from lmserve.api.json_response import json_response
from lmserve.api.replies import Reply, Whole

Answer = Callable[[Endpoint, Any], Awaitable[Reply]]


def mount(
    app: FastAPI,
    endpoints: Iterable[Endpoint],
    answer: Answer,
    sse_keep_alive_s: float | None = None,
) -> None:
    """Each endpoint as a POST route answered by `answer`; streams send an SSE comment after
    `sse_keep_alive_s` without an event. The bodies are parsed here, not by FastAPI, so the
    request models are added to the app's OpenAPI document by hand."""
    schemas: dict[str, Any] = {}
    for endpoint in endpoints:
        route = _route(endpoint, answer, sse_keep_alive_s)
        extra = None
        if endpoint.request is not None:
            name = endpoint.request.__name__
            schema = endpoint.request.model_json_schema(ref_template=_REF + "{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
            body = {"schema": {"$ref": _REF + name}}
            extra = {"requestBody": {"required": True, "content": {"application/json": body}}}
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
    endpoint: Endpoint, answer: Answer, sse_keep_alive_s: float | None
) -> Callable[[Request], Awaitable[Response]]:
    async def route(raw: Request) -> Response:
        try:
            body = await _json_body(raw)
            reply = await _unless_disconnected(raw, answer(endpoint, body))
        except Exception as exc:
            reply = error_reply(exc, endpoint.errors)
            if reply is None:
                raise
        if reply is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        if isinstance(reply, Whole):
            return json_response(reply.body, reply.status, reply.headers)
        lines = sse.lines(reply, sse_keep_alive_s)
        return StreamingResponse(lines, media_type="text/event-stream")

    route.__name__ = endpoint.name
    return route


async def _json_body(raw: Request) -> Any:
    try:
        return await raw.json()
    except ValueError as exc:
        raise APIError(f"The request body is not valid JSON: {exc}") from None


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
