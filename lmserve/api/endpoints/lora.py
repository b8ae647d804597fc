"""Runtime LoRA admin, as vLLM's: POST /v1/load_lora_adapter and /v1/unload_lora_adapter (only
with VLLM_ALLOW_RUNTIME_LORA_UPDATING; a single server's, not the Ray ingress's, whose replicas
load adapters by name from lora_config)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from lmserve.api.errors import APIError
from lmserve.api.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from lmserve.api.serving.common import ServingConfig
from lmserve.engine.protocol import EngineClient


def routes(engine: EngineClient, config: ServingConfig) -> APIRouter:
    router = APIRouter()

    def check_runtime_lora_updating() -> None:
        if not config.allow_runtime_lora_updating:
            raise APIError(
                "loading and unloading LoRA adapters at runtime is off; start the server with "
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (and --enable-lora)",
                status=404,
                code="not_found",
            )

    @router.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: LoadLoRAAdapterRequest) -> Response:
        check_runtime_lora_updating()
        config.lora_modules.add(engine, request.lora_name, request.lora_path)
        return Response(f"Success: LoRA adapter '{request.lora_name}' added successfully.")

    @router.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: UnloadLoRAAdapterRequest) -> Response:
        check_runtime_lora_updating()
        config.lora_modules.remove(request.lora_name)
        return Response(f"Success: LoRA adapter '{request.lora_name}' removed successfully.")

    return router
