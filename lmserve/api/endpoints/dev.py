"""vLLM's dev-only routes, served with VLLM_SERVER_DEV_MODE=1 as in vLLM: sleep mode's POST
/sleep, /wake_up, GET /is_sleeping, and POST /reset_prefix_cache."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from lmserve.api.errors import APIError
from lmserve.engine.protocol import EngineClient


def routes(engine: EngineClient) -> APIRouter:
    router = APIRouter()

    @router.post("/sleep")
    async def sleep(level: int = 1) -> Response:
        await engine.sleep(level)
        return Response(status_code=200)

    @router.post("/wake_up")
    async def wake_up(tags: Annotated[list[str] | None, Query()] = None) -> Response:
        if tags and set(tags) != {"weights", "kv_cache"}:
            raise APIError(
                f"waking only {', '.join(tags)} is not supported: the weights and the KV cache "
                "wake up together (omit tags)",
                param="tags",
            )
        await engine.wake_up()
        return Response(status_code=200)

    @router.get("/is_sleeping")
    async def is_sleeping() -> dict[str, bool]:
        return {"is_sleeping": engine.is_sleeping}

    @router.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> Response:
        await engine.reset_prefix_cache()
        return Response(status_code=200)

    return router
