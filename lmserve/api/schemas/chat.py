"""POST /v1/chat/completions: the completion and its stream's chunks."""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

from lmserve.api.schemas.common import PromptLogprobs, ResponseMetrics, Usage


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob]
    refusal: None = None


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatCompletionMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | UnsetType = UNSET
    # the reasoning: always there (null without a reasoning parser), as vLLM's; with a parser
    # also under its older name
    reasoning: str | None = None
    reasoning_content: str | None | UnsetType = UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None  # vLLM's: the stop string or token id that ended it
    token_ids: list[int] | UnsetType = UNSET  # return_token_ids


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None | UnsetType = UNSET
    prompt_token_ids: list[int] | UnsetType = UNSET
    metrics: ResponseMetrics | None | UnsetType = UNSET  # --enable-per-request-metrics


class DeltaFunction(msgspec.Struct, kw_only=True):
    name: str | UnsetType = UNSET  # on a call's first chunk
    arguments: str


class DeltaToolCall(msgspec.Struct, kw_only=True):
    index: int
    id: str | UnsetType = UNSET  # on a call's first chunk
    type: Literal["function"] | UnsetType = UNSET
    function: DeltaFunction


class ChatDelta(msgspec.Struct, kw_only=True):
    role: str | UnsetType = UNSET  # the first chunk of a choice
    content: str | UnsetType = UNSET
    reasoning_content: str | UnsetType = UNSET
    reasoning: str | UnsetType = UNSET
    tool_calls: list[DeltaToolCall] | UnsetType = UNSET

    def has_content(self) -> bool:
        return bool(self.content or self.reasoning_content or self.tool_calls)


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None | UnsetType = UNSET  # on the choice's last chunk
    token_ids: list[int] | UnsetType = UNSET  # return_token_ids: this chunk's new tokens


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | UnsetType = UNSET  # the last chunk, or each with continuous_usage_stats
    prompt_token_ids: list[int] | UnsetType = UNSET  # return_token_ids: on the first chunk
    metrics: ResponseMetrics | None | UnsetType = UNSET  # the usage chunk's, as a whole answer's
