"""Which adapter a request runs with (vLLM's `LoRARequest`)."""

from __future__ import annotations

import msgspec


class LoRARequest(msgspec.Struct, frozen=True):
    """`lora_int_id` identifies the adapter to the engine (positive, unique per adapter);
    `lora_path` is a PEFT directory (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id}")
