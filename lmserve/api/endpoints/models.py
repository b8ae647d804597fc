"""GET /v1/models and /v1/models/{model}: the served names and the adapters loaded."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from lmserve.api.serving import common
from lmserve.api.serving.models import model_card
from lmserve.engine.protocol import EngineClient


def routes(engine: EngineClient, config: common.ServingConfig) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> dict[str, Any]:
        return model_card(engine, name, config.lora_modules.get(name), config.model_name)

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        names = [*config.served_model_names, *config.lora_modules.names()]
        return {"object": "list", "data": [card(name) for name in names]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        common.check_model(config, model)
        return card(model)

    return router
