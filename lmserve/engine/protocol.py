"""EngineClient: what the HTTP and Ray layers depend on, never a concrete engine."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.messages import SchedulerStats
from lmserve.engine.metrics import EngineMetrics
from lmserve.lora.request import LoRARequest
from lmserve.outputs import PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine core process is gone; requests cannot be served until a restart."""


class EngineRequestError(RuntimeError):
    """The engine core failed while running this request (the core's log says why); the core
    itself goes on serving the others."""


class EngineSleepingError(RuntimeError):
    """The engine was put to sleep (sleep mode); requests wait for a wake-up, not a restart."""


class EngineClient(abc.ABC):
    config: EngineConfig
    tokenizer: Any | None
    metrics: EngineMetrics

    @property
    @abc.abstractmethod
    def is_healthy(self) -> bool: ...

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int | None:
        """The token that ends a generation (beam search finishes hypotheses on it)."""

    @property
    @abc.abstractmethod
    def num_prefill_tokens(self) -> int:
        """Prompt tokens of the requests taken that have no output token yet: the prefill
        backlog, which --max-num-queued-tokens bounds."""

    @abc.abstractmethod
    def generate(
        self,
        prompt: str | dict[str, Any],
        sampling_params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        stream_interval: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative snapshots of one request, the last one finished: the first, then one
        each `stream_interval` tokens (at least the server's --stream-interval), then the last."""

    @abc.abstractmethod
    async def encode(
        self,
        prompt: str | dict[str, Any],
        pooling_params: PoolingParams,
        request_id: str | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> PoolingRequestOutput:
        """A pooling model's output for one prompt; ValueError for bad input, before queueing."""

    @abc.abstractmethod
    def check_lora(self, lora_request: LoRARequest) -> None:
        """Raise ValueError when the adapter cannot be served (LoRA off, bad checkpoint)."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    async def get_stats(self) -> SchedulerStats: ...

    @abc.abstractmethod
    async def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1) or the weights too (level 2); ValueError when the engine
        is busy or sleep mode is off."""

    @abc.abstractmethod
    async def wake_up(self) -> None: ...

    @abc.abstractmethod
    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (vLLM's reset_prefix_cache), on every engine core."""

    @property
    @abc.abstractmethod
    def is_sleeping(self) -> bool: ...
