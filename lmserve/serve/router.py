"""LLMRouter: the OpenAI ingress. It serves lmserve.api's endpoint table by forwarding each
request to the deployment of the body's `model`, and encodes the replica's typed reply at the
same HTTP edge `lmserve serve` uses, so both servers answer every endpoint alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.responses import Response
from ray import serve
from ray.serve import Deployment
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from lmserve.api import edge
from lmserve.api.admission import overloaded
from lmserve.api.auth import install_auth, keys_from_env
from lmserve.api.edge import EdgeOptions
from lmserve.api.endpoints import ENDPOINTS, Endpoint, health, playground, responses
from lmserve.api.errors import APIError, install_error_handlers
from lmserve.api.json_response import json_response
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas.models import ModelCard, ModelList
from lmserve.api.serving.common import ServingConfig
from lmserve.serve.cluster_metrics import DASHBOARD_WINDOW_S, cluster_metrics_text
from lmserve.serve.config import LLMConfig
from lmserve.serve.server import StreamStart
from lmserve.tracing.context import current_trace_headers

# It only forwards: many requests in flight, and no CPU of its own, so a machine's CPUs go to
# the models (two models on 2 cores fit; with one CPU for the router they never would).
_ROUTER_OPTIONS = {
    "name": "LLMRouter",
    "max_ongoing_requests": 1024,
    "ray_actor_options": {"num_cpus": 0},
}


@serve.ingress()
class LLMRouter:
    async def __init__(self, llm_deployments: list[DeploymentHandle]) -> None:
        configs: list[LLMConfig] = await asyncio.gather(
            *(handle.llm_config.remote() for handle in llm_deployments)
        )
        cards = await asyncio.gather(*(handle.model_card.remote() for handle in llm_deployments))
        self._servers = {c.model_id: h for c, h in zip(configs, llm_deployments, strict=True)}
        self._cards = {c.model_id: card for c, card in zip(configs, cards, strict=True)}
        self._lora_paths = {  # model id -> dynamic_lora_loading_path
            c.model_id: c.lora_config.dynamic_lora_loading_path
            for c in configs
            if c.lora_config is not None and c.lora_config.dynamic_lora_loading_path
        }
        self._in_flight = 0  # requests this router replica is answering: its /load
        # The keys a deployment sets, where a vLLM user sets them: in the ingress's environment
        # or a model's runtime_env (Ray Serve LLM itself ignores them and runs open).
        self._api_keys = sorted(
            {*keys_from_env(), *(k for c in configs for k in keys_from_env(_env_vars(c)))}
        )
        servings = [ServingConfig([c.model_id], **c.serving_args) for c in configs]
        intervals = [s.sse_keep_alive_interval for s in servings]
        self._edge = EdgeOptions(
            sse_keep_alive_s=min((i for i in intervals if i is not None), default=None),
            max_body_mb=max(s.max_request_body_mb for s in servings),
        )

    @classmethod
    def as_deployment(cls, deployment_options: dict[str, Any] | None = None) -> Deployment:
        """Ray Serve LLM's form: `LLMRouter.as_deployment().bind([deployment, ...])`."""
        return serve.deployment(cls).options(**{**_ROUTER_OPTIONS, **(deployment_options or {})})

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The ingress's app, built on each router replica over its handles."""
        app = FastAPI(title="lmserve on Ray Serve", version=health.VERSION)
        install_error_handlers(app)
        if self._api_keys:
            install_auth(app, self._api_keys)
        edge.mount(app, ENDPOINTS, self._answer, self._edge)
        app.include_router(responses.routes())
        app.include_router(health.version_routes())
        # the chat page over every model here; the dashboard over every replica's metrics, as
        # Ray's Prometheus endpoints hold them (updated every 10 s: rates over a longer window)
        app.include_router(playground.routes(window_s=DASHBOARD_WINDOW_S))

        @app.get("/metrics")
        async def metrics() -> Response:
            text = await cluster_metrics_text()
            return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/v1/models")
        async def list_models() -> Response:
            cards = [self._card(name) for name in self._model_ids()]
            return json_response(ModelList(data=cards))

        @app.get("/v1/models/{model:path}")
        async def get_model(model: str) -> Response:
            if model not in self._model_ids():
                raise _not_found(model)
            return json_response(self._card(model))

        @app.get("/health")
        async def health_check() -> Response:
            return Response(status_code=200)

        @app.get("/ping")
        async def ping() -> Response:  # SageMaker's health check
            return Response(status_code=200)

        @app.get("/load")
        async def load() -> dict[str, int]:
            return {"server_load": self._in_flight}

        return app

    async def _answer(self, endpoint: Endpoint, body: Any) -> Reply:
        self._in_flight += 1
        try:
            # the client's trace context travels with the body to the replica's engine
            stream = (
                self._handle(body)
                .options(stream=True)
                .answer.remote(endpoint.name, body, current_trace_headers())
            )
            try:
                first = await stream.__anext__()
            except BackPressureError as exc:  # the deployment's max_queued_requests are waiting
                # never assigned to a replica: nothing to cancel (cancel() would raise it again)
                raise overloaded(str(exc)) from None
            except BaseException:
                stream.cancel()
                raise
        except BaseException:
            self._in_flight -= 1
            raise
        if isinstance(first, Whole):
            self._in_flight -= 1
            return first
        assert isinstance(first, StreamStart)
        return Stream(self._events(stream), first.done_marker)

    async def _events(self, stream: DeploymentResponseGenerator) -> AsyncIterator[Event]:
        """A replica's events; a client that leaves ends the replica's stream (and its
        request)."""
        try:
            async for item in stream:
                yield item
        finally:
            stream.cancel()
            self._in_flight -= 1

    def _handle(self, body: Any) -> DeploymentHandle:
        """The deployment for the body's `model`; `base:adapter` goes to the base model's
        deployment with the adapter as Serve's multiplexed model id, so it lands on replicas
        holding it. A body with no model goes to the only model; one that is no JSON object to
        any model, whose validation answers as `lmserve serve` does."""
        if not isinstance(body, dict):
            return next(iter(self._servers.values()))
        model = body.get("model")
        if model is None:
            if len(self._servers) == 1:
                return next(iter(self._servers.values()))
            raise APIError(
                f"give `model`: this server serves {', '.join(self._servers)}", param="model"
            )
        if isinstance(model, str):
            if model in self._servers:
                return self._servers[model]
            base, _, adapter = model.partition(":")
            if adapter and base in self._lora_paths:
                return self._servers[base].options(multiplexed_model_id=adapter)
        raise _not_found(model)

    def _model_ids(self) -> list[str]:
        ids = list(self._servers)
        for model_id, root in self._lora_paths.items():
            ids += _adapter_names(model_id, root)
        return ids

    def _card(self, name: str) -> ModelCard:
        base, _, adapter = name.partition(":")
        if name in self._cards or not adapter:
            return self._cards[name]
        root = str(Path(self._lora_paths[base]) / adapter)
        return msgspec.structs.replace(self._cards[base], id=name, root=root, parent=base)


def _not_found(model: Any) -> APIError:
    return APIError(
        f"The model `{model}` does not exist.", 404, param="model", code="model_not_found"
    )


def _adapter_names(model_id: str, root: str) -> list[str]:
    """`model_id:adapter` for each PEFT adapter directory under a dynamic_lora_loading_path."""
    path = Path(root)
    if not path.is_dir():
        return []
    found = (p.name for p in sorted(path.iterdir()) if (p / "adapter_config.json").is_file())
    return [f"{model_id}:{name}" for name in found]


def _env_vars(config: LLMConfig) -> dict[str, str]:
    return dict((config.runtime_env or {}).get("env_vars") or {})
