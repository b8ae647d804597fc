"""The wire between the frontend and the engine core: typed messages, one tagged union each way.

Every message is a msgspec Struct whose tag names it on the wire, so each side decodes straight
into the right type and dispatches with `match`. The core's scheduler builds `EngineCoreOutput`
and `SchedulerStats` itself (the one import `lmserve.core` makes from the engine), so nothing is
copied between its result and the wire.
"""

from __future__ import annotations

import enum

import msgspec

from lmserve.lora.request import LoRARequest
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    """Why the core ended a request (the frontend adds stop strings, reported as STOP)."""

    STOP = "stop"  # EOS, a stop token id, or a grammar that completed
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # asked to, or its grammar could not be built, or the engine went to sleep
    ERROR = "error"  # the core failed while running it (the core's log has the traceback)


class TokenLogprobs(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Logprobs at one position: the chosen token first, then the top-k, and the chosen one's rank."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


class EngineCoreOutput(msgspec.Struct, array_like=True, gc=False):
    """A request's progress after one step."""

    req_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # wall clock, on the request's first output
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    pooled: PooledData | None = None  # a pooling request's output
    no_speech_prob: float | None = None  # a Whisper request's, once its prompt ran


class PooledData(msgspec.Struct, frozen=True, gc=False):
    """A pooling output as float32 bytes with its shape: [dim] an embedding, [tokens, dim]
    every token's (ALL pooling); bytes on the wire, not lists of floats."""

    data: bytes
    shape: list[int]


class SchedulerStats(msgspec.Struct, frozen=True):
    """A snapshot of the scheduler: gauges now, counters since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of usable KV blocks held by requests
    num_free_blocks: int
    num_usable_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_step_tokens: int = 0  # tokens the last step ran through the model
    mm_cache_queries: int = 0  # images a prompt needed (vision-language models)
    mm_cache_hits: int = 0  # of those, found already encoded in the encoder cache
    # speculative decoding: steps that checked guesses, guessed tokens, accepted ones, and
    # accepted ones by position in the guess (acceptance rate = accepted / draft tokens)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = msgspec.field(default_factory=list)


# ---- to the core ---------------------------------------------------------------------------------
class PromptEmbeds(msgspec.Struct, frozen=True):
    """A prompt given as embeddings: float32 rows, one per prompt position, in place of the
    token embeddings (the prompt's token ids are placeholders)."""

    data: bytes  # [num_tokens, hidden_size] float32, row-major
    num_tokens: int
    hidden_size: int


class EncoderFeatures(msgspec.Struct, frozen=True):
    """An encoder-decoder request's encoder input: one audio window's log-mel features (Whisper:
    [mel bins, 3000 frames]) as float32 bytes, computed in the frontend."""

    data: bytes
    shape: list[int]


class ImageInput(msgspec.Struct, frozen=True):
    """One image of a vision-language prompt: the processor's pixel values (float32 bytes with
    their shape), the span of prompt positions its embedding rows fill, and a content hash
    that keys the encoder cache and salts the prefix-cache blocks the span falls in."""

    identifier: str  # sha256 of the pixel values
    offset: int  # first placeholder position in the prompt
    length: int  # positions of the span
    data: bytes
    shape: list[int]  # [channels, height, width]
    # one byte per position, 1 where a row goes (Pixtral's row breaks stay text); empty: all
    mask: bytes = b""


class EngineCoreRequest(msgspec.Struct, frozen=True, tag="add"):
    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None
    arrival_time: float
    cache_salt: str | None = None
    lora_request: LoRARequest | None = None
    prompt_embeds: PromptEmbeds | None = None
    pooling_params: PoolingParams | None = None  # set: a pooling request (sampling unused)
    token_type_ids: list[int] | None = None  # a sentence pair's segments (BERT cross-encoders)
    encoder_features: EncoderFeatures | None = None  # an encoder-decoder model's audio window
    images: list[ImageInput] = []  # a vision-language prompt's images, in prompt order


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    req_ids: list[str]


class GetStats(msgspec.Struct, frozen=True, tag="stats"):
    pass


class Sleep(msgspec.Struct, frozen=True, tag="sleep"):
    level: int


class WakeUp(msgspec.Struct, frozen=True, tag="wake_up"):
    pass


class ResetPrefixCache(msgspec.Struct, frozen=True, tag="reset_prefix_cache"):
    """Forget every cached prefix (answered with ControlDone)."""


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    pass


ToCore = EngineCoreRequest | Abort | GetStats | Sleep | WakeUp | ResetPrefixCache | Shutdown


# ---- from the core -------------------------------------------------------------------------------
class Ready(msgspec.Struct, frozen=True, tag="ready"):
    """The model is loaded and the KV cache allocated."""

    stats: SchedulerStats


class Outputs(msgspec.Struct, frozen=True, tag="outputs"):
    """One step's results, with the scheduler's state after it."""

    outputs: list[EngineCoreOutput]
    stats: SchedulerStats
    engine: int = 0  # which core (data parallel rank) ran the step


class Stats(msgspec.Struct, frozen=True, tag="stats"):
    """The answer to GetStats."""

    stats: SchedulerStats
    engine: int = 0


class ControlDone(msgspec.Struct, frozen=True, tag="done"):
    """The answer to Sleep or WakeUp: empty, or why it was refused."""

    error: str = ""


class CoreFailed(msgspec.Struct, frozen=True, tag="error"):
    """The core died (its traceback), or its process is gone."""

    reason: str


FromCore = Ready | Outputs | Stats | ControlDone | CoreFailed


def merge_stats(stats: list[SchedulerStats]) -> SchedulerStats:
    """Several engine cores' snapshots as one: counts and counters summed, the KV usage of all
    their blocks together (data parallel)."""
    if len(stats) == 1:
        return stats[0]
    usable = sum(s.num_usable_blocks for s in stats)
    free = sum(s.num_free_blocks for s in stats)
    per_pos = [0] * max((len(s.spec_accepted_per_pos) for s in stats), default=0)
    for s in stats:
        for pos, count in enumerate(s.spec_accepted_per_pos):
            per_pos[pos] += count
    return SchedulerStats(
        num_running=sum(s.num_running for s in stats),
        num_waiting=sum(s.num_waiting for s in stats),
        kv_cache_usage=1.0 - free / usable if usable else 0.0,
        num_free_blocks=free,
        num_usable_blocks=usable,
        num_preemptions=sum(s.num_preemptions for s in stats),
        prefix_cache_queries=sum(s.prefix_cache_queries for s in stats),
        prefix_cache_hits=sum(s.prefix_cache_hits for s in stats),
        num_step_tokens=sum(s.num_step_tokens for s in stats),
        mm_cache_queries=sum(s.mm_cache_queries for s in stats),
        mm_cache_hits=sum(s.mm_cache_hits for s in stats),
        spec_num_drafts=sum(s.spec_num_drafts for s in stats),
        spec_num_draft_tokens=sum(s.spec_num_draft_tokens for s in stats),
        spec_num_accepted_tokens=sum(s.spec_num_accepted_tokens for s in stats),
        spec_accepted_per_pos=per_pos,
    )
