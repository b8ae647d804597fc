"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path.

The request runs as a chat completion; its result (or its stream of chunks) is rewritten in
Anthropic's shapes: content blocks (thinking, text, tool_use), stop reasons, and the event
stream message_start, content_block_start/delta/stop, message_delta, message_stop. Errors are
Anthropic's {"type": "error", "error": {"type", "message"}}.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from lmserve.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from lmserve.api.errors import error_reply
from lmserve.api.protocol import ChatMessage
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas import messages as m
from lmserve.api.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatDelta
from lmserve.api.schemas.common import AnthropicErrorResponse
from lmserve.api.serving import common
from lmserve.api.serving.chat import ChatServing, apply_chat_template
from lmserve.engine.protocol import EngineClient


class MessagesServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig, chat: ChatServing):
        self.engine = engine
        self.config = config
        self.chat = chat

    async def create(self, request: MessagesRequest) -> Reply:
        result = await self.chat.create(request.chat_request())
        message_id = f"msg_{uuid.uuid4().hex}"
        if isinstance(result, Whole):
            return Whole(_message(message_id, result.body))
        return Stream(_events(message_id, result.events))

    async def count_tokens(self, request: CountTokensRequest) -> Reply:
        common.check_model(self.config, request.model)
        text = await apply_chat_template(
            self.engine,
            self.config,
            [ChatMessage(**m) for m in request.chat_messages()],
            None,
            add_generation_prompt=not request.continues_reply,
            continue_final_message=request.continues_reply,
            chat_template_kwargs=None,
            tools=request.chat_tools(),
        )
        assert self.engine.tokenizer is not None  # apply_chat_template checked it
        num_tokens = len(self.engine.tokenizer.encode(text, add_special_tokens=False))
        return Whole(m.CountTokensResponse(input_tokens=num_tokens))


def _message(message_id: str, chat: ChatCompletion) -> m.Message:
    choice = chat.choices[0]
    message = choice.message
    content: list[m.ContentBlock] = []
    if message.reasoning_content:
        content.append(m.ThinkingBlock(thinking=message.reasoning_content))
    if message.content:
        content.append(m.TextBlock(text=message.content))
    for call in message.tool_calls or []:
        function = call.function
        content.append(
            m.ToolUseBlock(id=call.id, name=function.name, input=_tool_input(function.arguments))
        )
    stop_reason, stop_sequence = _stop(choice.finish_reason, choice.stop_reason)
    usage = m.MessageUsage(
        input_tokens=chat.usage.prompt_tokens, output_tokens=chat.usage.completion_tokens
    )
    if chat.usage.prompt_tokens_details:  # --enable-prompt-tokens-details
        usage.cache_read_input_tokens = chat.usage.prompt_tokens_details.cached_tokens
    return m.Message(
        id=message_id,
        model=chat.model,
        content=content,
        stop_reason=stop_reason,
        stop_sequence=stop_sequence,
        usage=usage,
    )


async def _events(message_id: str, chunks: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The chat stream's chunks (with usage on each) as Anthropic's events."""
    blocks = _BlockStream()
    started = False
    stop: tuple[m.StopReason, str | None] = ("end_turn", None)
    output_tokens = 0
    input_tokens: int | None = None
    cache_read: int | None = None
    try:
        async for event in chunks:
            chunk = event.data
            assert isinstance(chunk, ChatCompletionChunk)
            usage = chunk.usage or None
            if usage:
                output_tokens, input_tokens = usage.completion_tokens, usage.prompt_tokens
                if usage.prompt_tokens_details:  # --enable-prompt-tokens-details
                    cache_read = usage.prompt_tokens_details.cached_tokens
            has_content = any(c.delta.has_content() for c in chunk.choices)
            if not started and (usage or has_content):
                started = True
                yield _event(m.MessageStart(message=_start(message_id, chunk, input_tokens or 0)))
            for choice in chunk.choices:
                for block_event in blocks.feed(choice.delta):
                    yield block_event
                if choice.finish_reason:
                    stop = _stop(choice.finish_reason, choice.stop_reason)
    except Exception as exc:  # noqa: BLE001 - an engine failure mid-stream is an error event
        reply = error_reply(exc, "anthropic")
        if reply is None:
            raise
        yield _event(reply.body)
        return
    for block_event in blocks.close():
        yield block_event
    delta = m.StopDelta(stop_reason=stop[0], stop_sequence=stop[1])
    usage = m.DeltaUsage(
        input_tokens=input_tokens, output_tokens=output_tokens, cache_read_input_tokens=cache_read
    )
    yield _event(m.MessageDelta(delta=delta, usage=usage))
    yield _event(m.MessageStop())


class _BlockStream:
    """Open content blocks as the deltas' kind changes: thinking, text, one per tool call."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: type[m.ContentBlock] | None = None

    def feed(self, delta: ChatDelta) -> list[Event]:
        events: list[Event] = []
        if delta.reasoning_content:
            events += self._open(m.ThinkingBlock(thinking=""))
            events.append(self._delta(m.ThinkingDelta(thinking=delta.reasoning_content)))
        if delta.content:
            events += self._open(m.TextBlock(text=""))
            events.append(self._delta(m.TextDelta(text=delta.content)))
        for call in delta.tool_calls or []:
            function = call.function
            if call.id:  # a new call
                events += self.close()
                events += self._open(m.ToolUseBlock(id=call.id, name=function.name or "", input={}))
            if function.arguments:
                events.append(self._delta(m.InputJSONDelta(partial_json=function.arguments)))
        return events

    def close(self) -> list[Event]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event(m.ContentBlockStop(index=self.index))]

    def _open(self, block: m.ContentBlock) -> list[Event]:
        if type(block) is self.kind and not isinstance(block, m.ToolUseBlock):
            return []
        events = self.close()
        self.index += 1
        self.kind = type(block)
        events.append(_event(m.ContentBlockStart(index=self.index, content_block=block)))
        return events

    def _delta(self, delta: m.TextDelta | m.ThinkingDelta | m.InputJSONDelta) -> Event:
        return _event(m.ContentBlockDelta(index=self.index, delta=delta))


def _start(message_id: str, chunk: ChatCompletionChunk, input_tokens: int) -> m.Message:
    return m.Message(
        id=message_id,
        model=chunk.model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=m.MessageUsage(input_tokens=input_tokens, output_tokens=0),
    )


def _event(payload: m.StreamEvent | AnthropicErrorResponse) -> Event:
    return Event.tagged(payload)


def _stop(finish_reason: str | None, stop_reason: object) -> tuple[m.StopReason, str | None]:
    """(Anthropic stop_reason, stop_sequence) for a chat choice's finish."""
    if finish_reason == "tool_calls":
        return "tool_use", None
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "stop" and isinstance(stop_reason, str):
        return "stop_sequence", stop_reason
    return "end_turn", None


def _tool_input(arguments: str) -> dict[str, Any]:
    """A call's JSON arguments as the object Anthropic's tool_use.input must be."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": value}
