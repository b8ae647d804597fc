"""GET /v1/models and /v1/models/{model}: the served names and the adapters loaded."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from lmserve.api.json_response import json_response
from lmserve.api.schemas.models import ModelCard, ModelList
from lmserve.api.serving import common
from lmserve.api.serving.models import model_card
from lmserve.engine.protocol import EngineClient


def routes(engine: EngineClient, config: common.ServingConfig) -> APIRouter:
    router = APIRouter()

    def card(name: str) -> ModelCard:
        return model_card(engine, name, config.lora_modules.get(name), config.model_name)

    @router.get("/v1/models")
    async def list_models() -> Response:
        names = [*config.served_model_names, *config.lora_modules.names()]
        return json_response(ModelList(data=[card(name) for name in names]))

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> Response:
        common.check_model(config, model)
        return json_response(card(model))

    return router
