"""Shapes every OpenAI family shares: usage, vLLM's prompt logprobs, the error body."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # with --enable-prompt-tokens-details: the prompt tokens found in the prefix cache
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> Usage:
        details = UNSET if cached is None else PromptTokensDetails(cached_tokens=cached)
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=details,
        )


class ResponseMetrics(msgspec.Struct, kw_only=True):
    """vLLM's per-request `metrics` (--enable-per-request-metrics), in milliseconds; a field is
    null where its moments were not seen."""

    time_to_first_token_ms: float | None  # first scheduling to first token
    generation_time_ms: float | None  # first token to last
    queue_time_ms: float | None  # arrival to first scheduling
    mean_itl_ms: float | None  # null for a one-token answer
    tokens_per_second: float | None  # all tokens over first scheduling to last token


class PromptLogprob(msgspec.Struct, kw_only=True):
    """vLLM's prompt_logprobs entry for one candidate token."""

    logprob: float
    rank: int | None
    decoded_token: str | None


# Per prompt token: None for the first, else {token id: its entry}.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class ErrorInfo(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None  # a string or null, as OpenAI's schema has it


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorInfo


class AnthropicErrorInfo(msgspec.Struct, kw_only=True):
    type: str
    message: str


class AnthropicErrorResponse(msgspec.Struct, tag="error", tag_field="type", kw_only=True):
    """Anthropic's error JSON, which its clients parse for the Messages routes."""

    error: AnthropicErrorInfo
