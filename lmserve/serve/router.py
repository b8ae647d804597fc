"""LLMRouter: the OpenAI ingress. It maps each request's `model` to its LLMServer deployment and
streams SSE back through Serve's streaming handles.

NOTE: no `from __future__ import annotations` here: Serve rebuilds the routes of an ingress
class, and FastAPI must see real types (a string "Request" becomes a query parameter).
"""

import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from lmserve.api.errors import error_body

app = FastAPI(title="lmserve on Ray Serve")


def _card(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "lmserve"}


def _not_found(model: Any) -> JSONResponse:
    return JSONResponse(
        error_body(
            f"The model `{model}` does not exist.", 404, param="model", code="model_not_found"
        ),
        status_code=404,
    )


def _adapter_names(model_id: str, root: str) -> list[str]:
    """`model_id:adapter` for each PEFT adapter directory under a dynamic_lora_loading_path."""
    path = Path(root)
    if not path.is_dir():
        return []
    found = (p.name for p in sorted(path.iterdir()) if (p / "adapter_config.json").is_file())
    return [f"{model_id}:{name}" for name in found]


@serve.ingress(app)
class LLMRouter:
    def __init__(
        self, servers: dict[str, DeploymentHandle], lora_paths: dict[str, str] | None = None
    ) -> None:
        self.servers = servers
        self.lora_paths = lora_paths or {}  # model id -> dynamic_lora_loading_path

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._forward("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward("completions", request)

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [_card(model_id) for model_id in self._model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> Response:
        if model_id not in self._model_ids():
            return _not_found(model_id)
        return JSONResponse(_card(model_id))

    def _model_ids(self) -> list[str]:
        ids = list(self.servers)
        for model_id, root in self.lora_paths.items():
            ids += _adapter_names(model_id, root)
        return ids

    @app.get("/health")
    async def health(self) -> Response:
        return Response(status_code=200)

    def _handle(self, model: Any) -> DeploymentHandle | None:
        """The deployment for `model`; `base:adapter` goes to the base model's deployment with
        the adapter as Serve's multiplexed model id, so it lands on replicas holding it."""
        if not isinstance(model, str):
            return None
        if model in self.servers:
            return self.servers[model]
        base, _, adapter = model.partition(":")
        if adapter and base in self.lora_paths:
            return self.servers[base].options(multiplexed_model_id=adapter)
        return None

    async def _forward(self, kind: str, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return JSONResponse(error_body(f"The request body is not valid JSON: {exc}", 400), 400)
        if not isinstance(body, dict):
            return JSONResponse(error_body("The request body must be a JSON object", 400), 400)
        model = body.get("model")
        if model is None and len(self.servers) == 1:
            model = next(iter(self.servers))
        handle = self._handle(model)
        if handle is None:
            return _not_found(model)
        body["model"] = model
        if not body.get("stream"):
            status, payload = await handle.generate.remote(kind, body)
            return JSONResponse(payload, status_code=status)
        stream = handle.options(stream=True).generate_stream.remote(kind, body)
        status, payload = await stream.__anext__()
        if status != 200:
            stream.cancel()
            return JSONResponse(payload, status_code=status)
        return StreamingResponse(stream, media_type="text/event-stream")
