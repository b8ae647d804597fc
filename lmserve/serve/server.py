"""LLMServer: one Serve replica hosting one AsyncEngine, answering through lmserve.api's serving
code (no second OpenAI layer). Results cross the handle as (status, body) pairs, so the router
returns the replica's own errors with their status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from lmserve.api.errors import error_for
from lmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.api.serving.chat import ChatServing
from lmserve.api.serving.common import ServingConfig
from lmserve.api.serving.completions import CompletionServing
from lmserve.engine.async_engine import AsyncEngine
from lmserve.serve.config import LLMConfig

Result = tuple[int, Any]  # (HTTP status, JSON body)
_REQUESTS: dict[str, type[BaseModel]] = {
    "chat": ChatCompletionRequest,
    "completions": CompletionRequest,
}


class LLMServer:
    async def __init__(self, llm_config: LLMConfig) -> None:
        self.llm_config = llm_config
        try:
            self.engine = await AsyncEngine.start(
                llm_config.model_source,
                start_timeout_s=llm_config.engine_start_timeout_s,
                **llm_config.engine_kwargs,
            )
        except TimeoutError as exc:
            raise RuntimeError(
                f"{llm_config.model_id}: {exc}; a model that needs longer to load needs a "
                f"larger engine_start_timeout_s (now {llm_config.engine_start_timeout_s:g} s)"
            ) from None
        serving = ServingConfig([llm_config.model_id])
        self._serving = {
            "chat": ChatServing(self.engine, serving),
            "completions": CompletionServing(self.engine, serving),
        }

    async def __del__(self) -> None:
        """Serve's replica shutdown (after its graceful wait for ongoing requests): requests
        still running are aborted, and the engine core process stops with the replica."""
        await self.engine.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core marks the replica unhealthy (restarted)."""
        if not self.engine.is_healthy:
            raise RuntimeError("the engine core process is gone")

    async def generate(self, kind: str, body: dict[str, Any]) -> Result:
        """A whole (non-streaming) answer."""
        result = await self._create(kind, body)
        if isinstance(result, tuple):
            return result
        assert isinstance(result, dict)
        return 200, result

    async def generate_stream(self, kind: str, body: dict[str, Any]) -> AsyncIterator[Any]:
        """The status first (with the error body when not 200), then SSE lines."""
        result = await self._create(kind, body)
        if isinstance(result, tuple):
            yield result
            return
        yield 200, None
        assert not isinstance(result, dict)
        async for line in result:
            yield line

    async def _create(self, kind: str, body: dict[str, Any]) -> Any:
        try:
            request = _REQUESTS[kind].model_validate(body)
            return await self._serving[kind].create(request)  # type: ignore[arg-type]
        except Exception as exc:
            known = error_for(exc)
            if known is None:
                raise
            return known
