"""The one currency between scheduler and worker: rebuilt every step, read-only after."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lmserve.engine.messages import EncoderFeatures, ImageInput, PromptEmbeds, TokenLogprobs
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
    prompt_embeds: PromptEmbeds | None = None
    # an encoder-decoder request: its encoder input, encoded into `cross_block_ids` this step
    encoder_features: EncoderFeatures | None = None
    cross_block_ids: list[int] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)  # a vision-language prompt's


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
    # requests whose scheduled tokens reach their last token, in batch order: they sample
    sampling_req_ids: list[str] = field(default_factory=list)
    # speculative decoding: the guessed tokens each request's scheduled tokens end with; its
    # logits at the last len + 1 positions check them
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class GrammarBitmask:
    """The allowed next tokens of this step's constrained requests: row i is `req_ids[i]`'s."""

    req_ids: list[str]
    bitmask: np.ndarray  # [num_constrained, ceil(vocab / 32)] int32, bit t of word w: token 32w+t


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """What the worker produced for one request this step: with guessed tokens, the accepted
    ones and then the model's own token."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    # Prompt logprobs for this chunk's positions (each predicting the next prompt token).
    prompt_logprobs: list[TokenLogprobs] | None = None
    no_speech_prob: float | None = None  # Whisper: computed in the step holding its prompt's SOT
    # a draft model's guesses of the tokens after these, for the request's next step
    draft_token_ids: list[int] | None = None
