"""One chat choice's generated text -> OpenAI message fields: reasoning, content and tool calls,
for the whole text or as stream deltas that concatenate to exactly the whole-text result."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from lmserve.api.reasoning import ReasoningParser, ReasoningStream
from lmserve.api.tool_parsers import (
    ToolCall,
    ToolCallDelta,
    ToolCallStream,
    ToolParser,
    random_id,
)


@dataclass(frozen=True)
class ToolMode:
    """How this request's tool calls come about: `auto` (a parser reads the model's own format),
    `required` / `named` (a grammar forces JSON the server turns into calls), or `none`."""

    choice: str
    name: str | None = None  # the function of a named tool_choice
    parser: ToolParser | None = None  # for auto
    parallel: bool = True  # parallel_tool_calls=False keeps only the first call


@dataclass(frozen=True)
class ParsedMessage:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class MessageDelta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def required_calls_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """tool_choice="required": a JSON array of at least one {name, parameters} call."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def new_call_id() -> str:
    return f"call_{random_id(24)}"


class MessageParser:
    def __init__(self, reasoning: ReasoningParser | None, tools: ToolMode) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def parse(self, text: str) -> ParsedMessage:
        reasoning, content = None, text
        if self.reasoning is not None:
            result = self.reasoning.extract(text)
            reasoning, content = result.reasoning, result.content
        mode = self.tools
        if mode.choice == "auto" and mode.parser is not None and content:
            extracted = mode.parser.extract(content)
            calls = extracted.tool_calls if mode.parallel else extracted.tool_calls[:1]
            return ParsedMessage(reasoning, extracted.content, calls)
        if mode.choice == "named" and content:
            assert mode.name is not None
            return ParsedMessage(reasoning, None, [ToolCall(new_call_id(), mode.name, content)])
        if mode.choice == "required" and content:
            calls = _required_calls(content)
            if calls is not None:
                return ParsedMessage(reasoning, None, calls)
        return ParsedMessage(reasoning, content or None, [])

    def stream(self) -> MessageStream:
        return MessageStream(self)


class MessageStream:
    """Feeds each new piece of a choice's text through the reasoning parser, then the tool-call
    handling of its mode."""

    def __init__(self, parser: MessageParser) -> None:
        self._tools = parser.tools
        self._reasoning: ReasoningStream | None = (
            parser.reasoning.stream() if parser.reasoning is not None else None
        )
        self._tool_stream: ToolCallStream | None = (
            parser.tools.parser.stream()
            if parser.tools.choice == "auto" and parser.tools.parser is not None
            else None
        )
        self._buffer: list[str] = []  # required: the whole JSON array, parsed at the end
        self._named_started = False
        self.called = False  # whether any tool call was sent

    def feed(self, text: str) -> MessageDelta:
        if self._reasoning is None:
            return self._content(text, final=False)
        part = self._reasoning.feed(text)
        delta = self._content(part.content or "", final=False)
        delta.reasoning = part.reasoning
        return delta

    def finish(self) -> MessageDelta:
        reasoning = None
        content = ""
        if self._reasoning is not None:
            part = self._reasoning.finish()
            reasoning, content = part.reasoning, part.content or ""
        delta = self._content(content, final=True)
        delta.reasoning = reasoning
        return delta

    def _content(self, text: str, final: bool) -> MessageDelta:
        mode = self._tools.choice
        if self._tool_stream is not None:
            out = self._tool_stream.feed(text) if text else None
            content = out.content if out else None
            calls = list(out.tool_calls) if out else []
            if final:
                tail = self._tool_stream.finish()
                content = (content or "") + (tail.content or "") or None
                calls += tail.tool_calls
            if not self._tools.parallel:
                calls = [c for c in calls if c.index == 0]
            self.called = self.called or bool(calls)
            return MessageDelta(content=content, tool_calls=calls)
        if mode == "named":
            if not text:
                return MessageDelta()
            first = not self._named_started
            self._named_started = self.called = True
            return MessageDelta(
                tool_calls=[
                    ToolCallDelta(
                        0,
                        new_call_id() if first else None,
                        self._tools.name if first else None,
                        text,
                    )
                ]
            )
        if mode == "required":
            self._buffer.append(text)
            if not final:
                return MessageDelta()
            whole = "".join(self._buffer)
            calls = _required_calls(whole) if whole else None
            if calls is None:
                return MessageDelta(content=whole or None)
            self.called = True
            return MessageDelta(
                tool_calls=[
                    ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)
                ]
            )
        return MessageDelta(content=text or None)


_SPACE = re.compile(r"\s*")


def _required_calls(text: str) -> list[ToolCall] | None:
    """The calls in a tool_choice="required" array; when max_tokens cut the array short, the
    calls completed before the cut. None when there is no complete call."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = _complete_items(text)
    if (
        not items
        or not isinstance(items, list)
        or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items)
    ):
        return None
    return [
        ToolCall(new_call_id(), i["name"], json.dumps(i.get("parameters", {}), ensure_ascii=False))
        for i in items
    ]


def _complete_items(text: str) -> list[Any]:
    """The whole elements at the start of a JSON array that was cut off (the grammar makes the
    text a valid prefix of one)."""
    decoder = json.JSONDecoder()
    at = _SPACE.match(text).end()
    if not text.startswith("[", at):
        return []
    items: list[Any] = []
    at += 1
    while True:
        try:
            item, at = decoder.raw_decode(text, _SPACE.match(text, at).end())
        except json.JSONDecodeError:
            return items
        items.append(item)
        at = _SPACE.match(text, at).end()
        if not text.startswith(",", at):
            return items
        at += 1
