"""Typed messages between the frontend and the engine core (msgspec-encodable for the process
boundary of the server)."""

from __future__ import annotations

import msgspec

from lmserve.core.scheduler import RequestUpdate
from lmserve.lora.request import LoRARequest
from lmserve.sampling_params import SamplingParams

# What the core reports per request per step.
EngineCoreOutput = RequestUpdate


class EngineCoreRequest(msgspec.Struct, frozen=True):
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None
