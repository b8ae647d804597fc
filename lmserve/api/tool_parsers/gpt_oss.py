"""`--tool-call-parser openai`: gpt-oss's calls, harmony messages to `functions.NAME` whose body
is the arguments object (lmserve/api/harmony.py):

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
    {"city": "Paris"}<|call|>

It reads the raw output, or what the `openai` reasoning parser leaves as content (the same
calls, as canonical messages, between the answer's text). Rules beyond the package's:
- Content is the `final` and `commentary` preamble bodies and text outside messages; analysis
  (and calls to built-in tools) is dropped, as vLLM's parser drops it: that is the reasoning
  parser's to return.
- A call commits at its body's "{". A body that is not an object is content; text after the
  object, up to the message's end, is dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from lmserve.api.harmony import Body, Closed, Event, HarmonyScanner, Loose, Opened
from lmserve.api.tool_parsers import ToolCallStream, ToolParser, random_id
from lmserve.api.tool_parsers.json_scanner import JsonScanner


class GptOssToolParser(ToolParser):
    needs_special_tokens = True

    def stream(self) -> HarmonyToolStream:
        return HarmonyToolStream(lambda: "call_" + random_id(24))


class _Sink(enum.Enum):
    CONTENT = enum.auto()
    DROP = enum.auto()  # analysis, a built-in tool's call, or what follows a call's object
    HEAD = enum.auto()  # a function call's body, until its "{"
    ARGUMENTS = enum.auto()


class HarmonyToolStream(ToolCallStream):
    def __init__(self, new_call_id: Callable[[], str]) -> None:
        super().__init__(new_call_id)
        self._scanner = HarmonyScanner()
        self._sink = _Sink.CONTENT
        self._name = ""
        self._head = ""  # a call's body before its "{": whitespace, or not a call after all
        self._json = JsonScanner()
        self._num_sent = 0

    def _advance(self, text: str, final: bool) -> int:
        events = self._scanner.feed(text)
        if final:
            events += self._scanner.finish()
        for event in events:
            self._event(event)
        return len(text)  # the scanner holds back what could still be a marker

    def _event(self, event: Event) -> None:
        match event:
            case Loose(text):
                self._content(text)
            case Opened(header) if header.function:
                self._sink, self._name, self._head = _Sink.HEAD, header.function, ""
            case Opened(header):
                self._sink = _Sink.DROP if header.is_reasoning else _Sink.CONTENT
            case Body(text):
                self._body(text)
            case Closed():
                if self._sink is _Sink.HEAD:
                    self._content(self._head)
                elif self._sink is _Sink.ARGUMENTS:
                    self._arguments(self._json.closers())
                self._sink = _Sink.CONTENT

    def _body(self, text: str) -> None:
        if self._sink is _Sink.CONTENT:
            self._content(text)
        elif self._sink is _Sink.HEAD:
            self._head += text
            start = self._head.lstrip()
            if start.startswith("{"):
                self._begin_call(self._name)
                self._sink, self._json, self._num_sent = _Sink.ARGUMENTS, JsonScanner(), 0
                self._push(start)
            elif start:
                self._sink = _Sink.CONTENT
                self._content(self._head)
        elif self._sink is _Sink.ARGUMENTS:
            self._push(text)

    def _push(self, text: str) -> None:
        self._json.push(text)
        end = self._json.closable_end
        self._arguments(self._json.text[self._num_sent : end])
        self._num_sent = end
        if self._json.failed:
            self._arguments(self._json.closers())
        if self._json.done or self._json.failed:
            self._sink = _Sink.DROP
