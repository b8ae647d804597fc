"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's message, content blocks and
stream events."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class TextBlock(msgspec.Struct, tag="text", tag_field="type", kw_only=True):
    text: str


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type", kw_only=True):
    thinking: str
    signature: str = ""


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type", kw_only=True):
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


class MessageUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    # Anthropic's cache counts: null unless known (reads: with --enable-prompt-tokens-details,
    # the prompt tokens found in the prefix cache; nothing is written on request here)
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(msgspec.Struct, kw_only=True):
    input_tokens: int


# ---- the stream's events; the tag is both the SSE event name and `type` ------------------------
class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type", kw_only=True):
    text: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type", kw_only=True):
    thinking: str


class InputJSONDelta(msgspec.Struct, tag="input_json_delta", tag_field="type", kw_only=True):
    partial_json: str


class MessageStart(msgspec.Struct, tag="message_start", tag_field="type", kw_only=True):
    message: Message


class ContentBlockStart(msgspec.Struct, tag="content_block_start", tag_field="type", kw_only=True):
    index: int
    content_block: ContentBlock


class ContentBlockDelta(msgspec.Struct, tag="content_block_delta", tag_field="type", kw_only=True):
    index: int
    delta: TextDelta | ThinkingDelta | InputJSONDelta


class ContentBlockStop(msgspec.Struct, tag="content_block_stop", tag_field="type", kw_only=True):
    index: int


class StopDelta(msgspec.Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct, kw_only=True):
    """message_delta's usage: the totals so far, as Anthropic's MessageDeltaUsage."""

    input_tokens: int | None
    output_tokens: int
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDelta(msgspec.Struct, tag="message_delta", tag_field="type", kw_only=True):
    delta: StopDelta
    usage: DeltaUsage


class MessageStop(msgspec.Struct, tag="message_stop", tag_field="type", kw_only=True):
    pass


StreamEvent = (
    MessageStart
    | ContentBlockStart
    | ContentBlockDelta
    | ContentBlockStop
    | MessageDelta
    | MessageStop
)
