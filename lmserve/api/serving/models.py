"""The models a server answers to: the base model's names and LoRA adapters served by name
(`--lora-modules`, `/v1/load_lora_adapter`, Ray Serve multiplexing), as vLLM lists them."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from lmserve.api.errors import APIError
from lmserve.api.schemas.models import ModelCard
from lmserve.engine.protocol import EngineClient
from lmserve.lora.request import LoRARequest


class LoRAModules:
    """Adapters by name. Each load gets a fresh id, so a name reloaded from another path is never
    served from the engine's copy of the old one."""

    def __init__(self) -> None:
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return list(self._by_name)

    def add(self, engine: EngineClient, name: str, path: str) -> LoRARequest:
        """Check the adapter with the engine, then serve it as `name` (400 when it cannot be)."""
        if name in self._by_name:
            raise APIError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        if not Path(path).exists():  # as vLLM: a missing adapter is not found, not bad input
            raise APIError(
                f"No adapter found for {path}", status=404, param="lora_path", code="not_found"
            )
        request = LoRARequest(name, next(self._ids), path)
        try:
            engine.check_lora(request)
        except ValueError as exc:
            raise APIError(str(exc), param="lora_path") from None
        self._by_name[name] = request
        return request

    def remove(self, name: str) -> None:
        if self._by_name.pop(name, None) is None:
            raise APIError(
                f"The lora adapter '{name}' cannot be found.",
                status=404,
                param="lora_name",
                code="model_not_found",
            )


def model_card(
    engine: EngineClient, name: str, lora: LoRARequest | None = None, parent: str | None = None
) -> ModelCard:
    """vLLM's /v1/models entry: an adapter's root is its path, its parent the base model's name."""
    return ModelCard(
        id=name,
        created=int(time.time()),
        root=lora.lora_path if lora else str(engine.config.model.model),
        parent=parent if lora else None,
        max_model_len=engine.config.scheduler.max_model_len,
    )
