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
        text = apply_chat_template(
            self.engine,
            [ChatMessage(**m) for m in request.chat_messages()],
            self.config.chat_template,
            add_generation_prompt=not request.continues_reply,
            continue_final_message=request.continues_reply,
            chat_template_kwargs=None,
            content_format=self.config.chat_template_content_format,
            tools=request.chat_tools(),
        )
        assert self.engine.tokenizer is not None  # apply_chat_template checked it
        return Whole(
            {"input_tokens": len(self.engine.tokenizer.encode(text, add_special_tokens=False))}
        )


def _message(message_id: str, chat: dict[str, Any]) -> dict[str, Any]:
    choice = chat["choices"][0]
    message = choice["message"]
    content: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        content.append(
            {"type": "thinking", "thinking": message["reasoning_content"], "signature": ""}
        )
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call["function"]
        content.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": function["name"],
                "input": _tool_input(function["arguments"]),
            }
        )
    stop_reason, stop_sequence = _stop(choice["finish_reason"], choice.get("stop_reason"))
    usage = {
        "input_tokens": chat["usage"]["prompt_tokens"],
        "output_tokens": chat["usage"]["completion_tokens"],
    }
    if "prompt_tokens_details" in chat["usage"]:  # --enable-prompt-tokens-details
        usage["cache_read_input_tokens"] = chat["usage"]["prompt_tokens_details"]["cached_tokens"]
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": chat["model"],
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


async def _events(message_id: str, chunks: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """The chat stream's chunks (with usage on each) as Anthropic's events."""
    blocks = _BlockStream()
    started = False
    stop: tuple[str | None, str | None] = ("end_turn", None)
    output_tokens = 0
    try:
        async for event in chunks:
            chunk = event.data
            usage = chunk.get("usage")
            if usage:
                output_tokens = usage["completion_tokens"]
            choices = chunk.get("choices") or []
            has_content = any(_has_content(c.get("delta") or {}) for c in choices)
            if not started and (usage or has_content):
                started = True
                input_tokens = usage["prompt_tokens"] if usage else 0
                yield _event("message_start", {"message": _start(message_id, chunk, input_tokens)})
            for choice in choices:
                for event in blocks.feed(choice.get("delta") or {}):
                    yield event
                if choice.get("finish_reason"):
                    stop = _stop(choice["finish_reason"], choice.get("stop_reason"))
    except Exception as exc:  # noqa: BLE001 - an engine failure mid-stream is an error event
        reply = error_reply(exc, "anthropic")
        if reply is None:
            raise
        yield _event("error", {"error": reply.body["error"]})
        return
    for event in blocks.close():
        yield event
    delta = {"stop_reason": stop[0], "stop_sequence": stop[1]}
    yield _event("message_delta", {"delta": delta, "usage": {"output_tokens": output_tokens}})
    yield _event("message_stop", {})


class _BlockStream:
    """Open content blocks as the deltas' kind changes: thinking, text, one per tool call."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def feed(self, delta: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        if delta.get("reasoning_content"):
            events += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            events.append(
                self._delta({"type": "thinking_delta", "thinking": delta["reasoning_content"]})
            )
        if delta.get("content"):
            events += self._open("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or []:
            function = call.get("function") or {}
            if call.get("id"):  # a new call
                events += self.close()
                block = {
                    "type": "tool_use",
                    "id": call["id"],
                    "name": function.get("name"),
                    "input": {},
                }
                events += self._open("tool_use", block)
            if function.get("arguments"):
                events.append(
                    self._delta({"type": "input_json_delta", "partial_json": function["arguments"]})
                )
        return events

    def close(self) -> list[Event]:
        if self.kind is None:
            return []
        self.kind = None
        return [_event("content_block_stop", {"index": self.index})]

    def _open(self, kind: str, block: dict[str, Any]) -> list[Event]:
        if self.kind == kind and kind != "tool_use":
            return []
        events = self.close()
        self.index += 1
        self.kind = kind
        events.append(_event("content_block_start", {"index": self.index, "content_block": block}))
        return events

    def _delta(self, delta: dict[str, Any]) -> Event:
        return _event("content_block_delta", {"index": self.index, "delta": delta})


def _has_content(delta: dict[str, Any]) -> bool:
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _start(message_id: str, chunk: dict[str, Any], input_tokens: int) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": chunk["model"],
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 0},
    }


def _event(kind: str, payload: dict[str, Any]) -> Event:
    return Event({"type": kind, **payload}, name=kind)


def _stop(finish_reason: str | None, stop_reason: Any) -> tuple[str, str | None]:
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
