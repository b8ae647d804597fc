"""The one currency between scheduler and worker: rebuilt every step, read-only after."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmserve.lora.request import LoRARequest
from lmserve.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """A request the worker has not seen (or lost to preemption): everything it needs, in full."""

    req_id: str
    token_ids: list[int]  # prompt + any outputs so far (a resumed request recomputes them)
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_id: int | None
    lora_request: LoRARequest | None = None


@dataclass(frozen=True, slots=True)
class CachedRequestData:
    """A request the worker already holds: only what changed."""

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(frozen=True)
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    # req_id -> tokens to compute this step, in batch order (new requests after running ones)
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # requests the worker must forget before this step: finished, aborted or preempted
    finished_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Logprobs at one position: the chosen token first, then the top-k, and the chosen one's rank."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """What the worker produced for one request this step."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    # Prompt logprobs for this chunk's positions (each predicting the next prompt token).
    prompt_logprobs: list[TokenLogprobs] | None = None
