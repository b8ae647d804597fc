"""The one mutable record of a request inside the engine core."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from lmserve.engine.messages import EncoderFeatures, FinishReason, ImageInput, PromptEmbeds
from lmserve.lora.request import LoRARequest
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered lifecycle: every status past PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


class RequestFailed(Exception):
    """Raised by a part of a step that knows which requests it failed for, so the engine core
    ends those requests only and keeps serving the others."""

    def __init__(self, req_ids: list[str], reason: str) -> None:
        super().__init__(reason)
        self.req_ids = req_ids


@dataclass(eq=False)
class Request:
    """Tokens so far (prompt + output), how many have KV computed, and why it stopped.

    NOTE: `num_computed_tokens` counts tokens whose KV is (or, once the scheduled step runs, will
    be) in the cache; it may trail `num_tokens` by a chunk while the prompt is prefilled.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = 0.0
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None
    prompt_embeds: PromptEmbeds | None = None  # the prompt's embeddings, its ids placeholders
    pooling_params: PoolingParams | None = None  # set: a pooling request
    token_type_ids: list[int] | None = None  # a sentence pair's segments (BERT cross-encoders)
    encoder_features: EncoderFeatures | None = None  # an encoder-decoder model's input
    num_encoder_tokens: int = 0  # encoder states its cross-attention reads (KV blocks held)
    images: list[ImageInput] = field(default_factory=list)  # a vision-language prompt's
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1  # prefix-cache hit length on first scheduling; -1 until then
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    stop_reason: int | None = None  # the stop token id that ended it
    block_hashes: list[bytes] = field(default_factory=list)
    # speculative decoding: guessed next tokens, checked (and dropped) by the next step
    spec_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def hash_salt(self) -> str | None:
        """Salts the first block's prefix-cache hash: requests share KV only with the same
        cache_salt and the same adapter (an adapter changes every layer's K/V)."""
        if self.lora_request is None:
            return self.cache_salt
        lora = self.lora_request
        return f"{self.cache_salt or ''}|lora:{lora.lora_int_id}:{lora.lora_name}"

    def block_salt(self, index: int, block_size: int) -> str | None:
        """What salts block `index`'s prefix-cache hash besides its tokens: the root's
        `hash_salt`, and the hash of every image whose placeholders fall in the block (the
        same text with another image must never reuse its KV)."""
        parts = [self.hash_salt or ""] if index == 0 and self.hash_salt else []
        start, end = index * block_size, (index + 1) * block_size
        parts += [
            f"image:{image.identifier}"
            for image in self.images
            if image.offset < end and image.offset + image.length > start
        ]
        return "|".join(parts) or None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
