"""LLMServer: one Serve replica hosting one AsyncEngine, answering through lmserve.api's serving
code (no second OpenAI layer). Results cross the handle as (status, body) pairs, so the router
returns the replica's own errors with their status."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from ray import serve

from lmserve.api.errors import APIError, error_for
from lmserve.api.protocol import ChatCompletionRequest, CompletionRequest
from lmserve.api.serving.chat import ChatServing
from lmserve.api.serving.common import ServingConfig
from lmserve.api.serving.completions import CompletionServing
from lmserve.api.serving.models import LoRAModules
from lmserve.engine.async_engine import AsyncEngine
from lmserve.lora.request import LoRARequest
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
                **llm_config.engine_args,
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
        self._adapters = serving.lora_modules
        lora = llm_config.lora_config
        if lora is not None:

            async def load(adapter: str) -> _ServedAdapter:
                return self._load_adapter(adapter)

            # a function, not a bound method: Serve keeps its per-replica LRU on the callable
            self._multiplexed_load = serve.multiplexed(
                max_num_models_per_replica=lora.max_num_adapters_per_replica
            )(load)

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

    def _load_adapter(self, adapter: str) -> _ServedAdapter:
        """Serve `model_id:adapter` from the adapter's directory (Serve calls this through the
        multiplexed loader, at most once while the adapter stays loaded)."""
        lora = self.llm_config.lora_config
        assert lora is not None
        name = f"{self.llm_config.model_id}:{adapter}"
        root = lora.dynamic_lora_loading_path
        path = Path(root or "") / adapter
        if root is None or "/" in adapter or adapter in ("", ".", "..") or not path.is_dir():
            raise APIError(
                f"The model `{name}` does not exist.", 404, param="model", code="model_not_found"
            )
        request = self._adapters.get(name) or self._adapters.add(self.engine, name, str(path))
        return _ServedAdapter(self._adapters, request)

    async def _create(self, kind: str, body: dict[str, Any]) -> Any:
        try:
            adapter = serve.get_multiplexed_model_id()
            if adapter:
                if self.llm_config.lora_config is None:
                    raise APIError(
                        f"{self.llm_config.model_id} serves no LoRA adapters (no lora_config)",
                        404,
                        param="model",
                        code="model_not_found",
                    )
                await self._multiplexed_load(adapter)
            request = _REQUESTS[kind].model_validate(body)
            return await self._serving[kind].create(request)  # type: ignore[arg-type]
        except Exception as exc:
            known = error_for(exc)
            if known is None:
                raise
            return known


class _ServedAdapter:
    """What the multiplexed loader hands Serve for one adapter; Serve calls __del__ when its LRU
    evicts the adapter from this replica, which stops serving it by name."""

    def __init__(self, modules: LoRAModules, request: LoRARequest) -> None:
        self.modules = modules
        self.request = request

    def __del__(self) -> None:
        # only this load's registration: the adapter may have been evicted and loaded again
        if self.modules.get(self.request.lora_name) is self.request:
            self.modules.remove(self.request.lora_name)
