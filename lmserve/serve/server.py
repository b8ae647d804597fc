"""LLMServer: one Serve replica hosting one AsyncEngine, answering the endpoint table of
lmserve.api (no second OpenAI layer). Replies cross the handle as typed objects: a `Whole`
(errors too, with their status), or a `StreamStart` and then the stream's `Event`s, which the
ingress encodes as SSE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from lmserve.api.endpoints import ENDPOINTS_BY_NAME, Servings
from lmserve.api.errors import APIError, error_reply
from lmserve.api.replies import Event, Whole
from lmserve.api.schemas.models import ModelCard
from lmserve.api.serving.common import ServingConfig
from lmserve.api.serving.models import LoRAModules, model_card
from lmserve.engine.async_engine import AsyncEngine
from lmserve.lora.request import LoRARequest
from lmserve.serve.config import LLMConfig
from lmserve.serve.engine_metrics import RayMetricsMirror
from lmserve.tracing.context import trace_context


@dataclass(frozen=True, slots=True)
class StreamStart:
    """The first item of a streamed reply over the handle; its events follow."""

    done_marker: bool


ReplyItem = Whole | StreamStart | Event


class LLMServer:
    async def __init__(self, llm_config: LLMConfig) -> None:
        self._llm_config = llm_config
        try:
            self.engine = await AsyncEngine.start(
                llm_config.model_source,
                start_timeout_s=llm_config.engine_start_timeout_s,
                **{"served_model_name": llm_config.model_id, **llm_config.engine_args},
            )
        except TimeoutError as exc:
            raise RuntimeError(
                f"{llm_config.model_id}: {exc}; a model that needs longer to load needs a "
                f"larger engine_start_timeout_s (now {llm_config.engine_start_timeout_s:g} s)"
            ) from None
        self._metrics: RayMetricsMirror | None = None
        if llm_config.log_engine_metrics:
            self._metrics = RayMetricsMirror(self.engine.metrics.registry)
            self._metrics.start()
        serving = ServingConfig([llm_config.model_id], **llm_config.serving_args)
        self._servings = Servings(self.engine, serving)
        self._adapters = serving.lora_modules
        lora = llm_config.lora_config
        if lora is not None:

            async def load(adapter: str) -> _ServedAdapter:
                return self._load_adapter(adapter)

            # a function, not a bound method: Serve keeps its per-replica LRU on the callable
            self._multiplexed_load = serve.multiplexed(
                max_num_models_per_replica=lora.max_num_adapters_per_replica
            )(load)

    @classmethod
    def as_deployment(cls, deployment_options: dict[str, Any] | None = None) -> LLMServerDeployment:
        """Ray Serve LLM's form, `LLMServer.as_deployment(options).bind(llm_config)`."""
        return LLMServerDeployment(dict(deployment_options or {}))

    async def __del__(self) -> None:
        """Serve's replica shutdown (after its graceful wait for ongoing requests): requests
        still running are aborted, and the engine core process stops with the replica."""
        if self._metrics is not None:
            await self._metrics.stop()
        await self.engine.shutdown()

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core marks the replica unhealthy (restarted)."""
        if not self.engine.is_healthy:
            raise RuntimeError("the engine core process is gone")

    async def llm_config(self) -> LLMConfig:
        """What the router asks each deployment it is bound to: the model it serves."""
        return self._llm_config

    async def model_card(self) -> ModelCard:
        """This model's /v1/models entry, as `lmserve serve` lists it."""
        return model_card(self.engine, self._llm_config.model_id)

    async def answer(
        self, endpoint_name: str, body: Any, trace_headers: dict[str, str] | None = None
    ) -> AsyncIterator[ReplyItem]:
        """The endpoint's reply to a JSON body: a `Whole`, or a `StreamStart` and the events
        (`trace_headers`: the client's W3C trace context, which the router saw)."""
        endpoint = ENDPOINTS_BY_NAME[endpoint_name]
        try:
            await self._load_requested_adapter()
        except Exception as exc:
            error = error_reply(exc, endpoint.errors)
            if error is None:
                raise
            yield error
            return
        with trace_context(trace_headers or {}):
            reply = await self._servings.answer(endpoint, body)
        if isinstance(reply, Whole):
            yield reply
            return
        yield StreamStart(reply.done_marker)
        async for event in reply.events:
            yield event

    async def _load_requested_adapter(self) -> None:
        """The adapter of a `model_id:adapter` request, loaded on this replica if not already."""
        adapter = serve.get_multiplexed_model_id()
        if not adapter:
            return
        if self._llm_config.lora_config is None:
            raise APIError(
                f"{self._llm_config.model_id} serves no LoRA adapters (no lora_config)",
                404,
                param="model",
                code="model_not_found",
            )
        await self._multiplexed_load(adapter)

    def _load_adapter(self, adapter: str) -> _ServedAdapter:
        """Serve `model_id:adapter` from the adapter's directory (Serve calls this through the
        multiplexed loader, at most once while the adapter stays loaded)."""
        lora = self._llm_config.lora_config
        assert lora is not None
        name = f"{self._llm_config.model_id}:{adapter}"
        root = lora.dynamic_lora_loading_path
        path = Path(root or "") / adapter
        if root is None or "/" in adapter or adapter in ("", ".", "..") or not path.is_dir():
            raise APIError(
                f"The model `{name}` does not exist.", 404, param="model", code="model_not_found"
            )
        request = self._adapters.get(name) or self._adapters.add(self.engine, name, str(path))
        return _ServedAdapter(self._adapters, request)


VLLMService = LLMServer  # the name Ray Serve LLM's first releases gave it


@dataclass(frozen=True)
class LLMServerDeployment:
    """An LLMServer deployment waiting for its LLMConfig. Bound, its options are the config's
    own (`get_serve_options`: deployment_config, runtime_env, placement) with these over them,
    so a config's autoscaling applies however the deployment was made."""

    overrides: dict[str, Any]

    def options(self, **overrides: Any) -> LLMServerDeployment:
        return LLMServerDeployment({**self.overrides, **overrides})

    def bind(self, llm_config: LLMConfig | dict[str, Any]) -> Application:
        config = LLMConfig.model_validate(llm_config)
        options = {**config.get_serve_options(), **self.overrides}
        return serve.deployment(LLMServer).options(**options).bind(config)


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
