"""GET /v1/models: the served names and adapters, as vLLM lists them."""

from __future__ import annotations

from typing import Literal

import msgspec


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmserve"
    root: str  # the base model's path, or an adapter's
    parent: str | None  # an adapter's base model
    max_model_len: int


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[ModelCard]
