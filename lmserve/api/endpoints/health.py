"""GET /health, /ping, /version, /load and /metrics: liveness, load and Prometheus metrics."""

from __future__ import annotations

import importlib.metadata

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmserve.api.errors import error_response
from lmserve.api.http_metrics import HTTPMetrics
from lmserve.engine.protocol import EngineClient

VERSION = importlib.metadata.version("lmserve")


def version_routes() -> APIRouter:
    """What needs no engine, served by both servers as it is."""
    router = APIRouter()

    @router.get("/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    return router


def routes(engine: EngineClient, http_metrics: HTTPMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        if not engine.is_healthy:
            return error_response("The engine is not running", 503)
        return Response(status_code=200)

    @router.get("/ping")
    async def ping() -> Response:
        return await health()

    @router.get("/load")
    async def load() -> dict[str, int]:
        stats = await engine.get_stats()
        return {"server_load": stats.num_running + stats.num_waiting}

    @router.get("/metrics")
    async def metrics() -> Response:
        await engine.get_stats()  # fresh gauges even when idle
        text = generate_latest(engine.metrics.registry) + generate_latest(http_metrics.registry)
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return router
