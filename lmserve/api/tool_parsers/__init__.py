"""Tool-call parsers (`--tool-call-parser`): read the calls a model wrote in its own markup out of
its text, whole or streamed.

Each format is one state machine whose decisions depend only on the text, never on where it
was cut: it holds back what could still be markup until later text settles it. `extract()` is
that stream fed the whole text, so streamed deltas, concatenated, equal `extract()` for any
chunking (the tests cut every sample at every position).

Shared rules:
- A call's name is sent once it is complete, and its arguments only once they cannot change:
  each fragment stays a prefix of the final arguments, which are always a JSON object.
- A call is *committed* (its id and name sent) at a point each format fixes, never before its
  name is complete (for JSON formats: once its arguments object has begun); from then on it
  stands. A block of markup that breaks before its first call commits is content, as written.
  When a committed call breaks off (cut short by `max_tokens`, or invalid), its arguments are
  closed as they stand (open strings and brackets closed, or the parameters read so far) and the
  rest of its block is dropped, up to the format's end marker or, without one, the output's end.
- Content is the text outside calls; a stretch of it that is only whitespace (the newlines
  between calls) is dropped, so content is never whitespace alone: it is `None` instead.
"""

from __future__ import annotations

import importlib
import secrets
import string
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def random_id(num_chars: int) -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(num_chars))


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object


@dataclass(frozen=True, slots=True)
class ExtractedToolCalls:
    tool_calls: list[ToolCall]
    content: str | None  # None when there is no text outside the calls

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """OpenAI's streamed piece of one call: the first carries its id and complete name."""

    index: int
    id: str | None
    name: str | None
    arguments: str  # the next fragment; "" on a first delta with none yet


@dataclass(frozen=True, slots=True)
class StreamDelta:
    content: str | None  # None, never "", when there is no new content
    tool_calls: list[ToolCallDelta]


class ToolCallStream(ABC):
    """Reads one output as it streams in; one per output (choice), never reused.

    Subclasses implement `_advance` with the helpers below; the content and call bookkeeping
    here is shared, so every format follows the same whitespace and delta rules.
    """

    def __init__(self, new_call_id: Callable[[], str]) -> None:
        self._new_call_id = new_call_id
        self._pending = ""  # received but not yet consumed by `_advance`
        self._num_calls = 0
        self._content_parts: list[str] = []
        self._call_deltas: list[ToolCallDelta] = []
        self._blank = ""  # the current content stretch while it is whitespace only
        self._stretch_has_text = False

    def feed(self, delta_text: str) -> StreamDelta:
        """Take the next piece of output; may hold back a suffix that could still be markup."""
        text = self._pending + delta_text
        self._pending = text[self._advance(text, final=False) :]
        return self._take()

    def finish(self) -> StreamDelta:
        """Settle everything held back: unfinished markup is content, or closes its call."""
        self._advance(self._pending, final=True)
        self._pending = self._blank = ""
        return self._take()

    @abstractmethod
    def _advance(self, text: str, final: bool) -> int:
        """Read `text` (what is held plus the new piece) and return how many leading characters
        were consumed; the rest is offered again with the next piece. `final`: the output has
        ended, so all of it must be consumed and any open call closed."""

    def _content(self, text: str) -> None:
        if self._stretch_has_text:
            if text:
                self._content_parts.append(text)
        elif text.strip():
            self._content_parts.append(self._blank + text)
            self._blank, self._stretch_has_text = "", True
        else:
            self._blank += text

    def _begin_call(self, name: str) -> None:
        """Open the next call; it also ends the current content stretch."""
        self._blank, self._stretch_has_text = "", False
        self._call_deltas.append(ToolCallDelta(self._num_calls, self._new_call_id(), name, ""))
        self._num_calls += 1

    def _arguments(self, fragment: str) -> None:
        if fragment:
            self._call_deltas.append(ToolCallDelta(self._num_calls - 1, None, None, fragment))

    def _take(self) -> StreamDelta:
        merged: list[ToolCallDelta] = []
        for delta in self._call_deltas:
            if merged and merged[-1].index == delta.index:
                merged[-1] = replace(merged[-1], arguments=merged[-1].arguments + delta.arguments)
            else:
                merged.append(delta)
        content = "".join(self._content_parts) or None
        self._content_parts, self._call_deltas = [], []
        return StreamDelta(content, merged)


class ToolParser(ABC):
    """Knows one model family's tool-call markup. Built per request with the request's tools
    (OpenAI tool dicts, possibly none), which only formats with untyped values consult."""

    # Whether the markup is made of special tokens the detokenizer must keep.
    needs_special_tokens: bool = False

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self.tools = tools

    @abstractmethod
    def stream(self) -> ToolCallStream:
        """A fresh streaming reader."""

    def extract(self, text: str) -> ExtractedToolCalls:
        """Read a finished output: the stream, fed it whole, so the two always agree."""
        stream = self.stream()
        deltas = [stream.feed(text), stream.finish()]
        calls: list[list[str]] = []
        for delta in deltas:
            for call in delta.tool_calls:
                if call.id is not None and call.name is not None:
                    calls.append([call.id, call.name, ""])
                calls[call.index][2] += call.arguments
        content = "".join(d.content or "" for d in deltas) or None
        return ExtractedToolCalls([ToolCall(*call) for call in calls], content)


# Imported on first use: the parser modules import the base types above from this package.
_PARSER_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "hermes": "lmserve.api.tool_parsers.hermes:HermesToolParser",
        "llama3_json": "lmserve.api.tool_parsers.llama3_json:Llama3JsonToolParser",
        "mistral": "lmserve.api.tool_parsers.mistral:MistralToolParser",
        "openai": "lmserve.api.tool_parsers.gpt_oss:GptOssToolParser",
        "pythonic": "lmserve.api.tool_parsers.pythonic:PythonicToolParser",
        "qwen3_xml": "lmserve.api.tool_parsers.qwen3_xml:Qwen3XmlToolParser",
    }
)
TOOL_PARSERS: tuple[str, ...] = tuple(_PARSER_PATHS)


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name` (the `--tool-call-parser` value)."""
    path = _PARSER_PATHS.get(name)
    if path is None:
        raise ValueError(
            f"unknown tool call parser {name!r}; known parsers: {', '.join(TOOL_PARSERS)}"
        )
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
