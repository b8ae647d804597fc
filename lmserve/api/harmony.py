"""OpenAI's harmony format (gpt-oss), read from text that kept its special tokens.

The chat template ends the prompt with `<|start|>assistant`, so an output reads

    <|channel|>analysis<|message|>Thinking...<|end|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

and a tool call is a message to a recipient, named in the header before or after the channel,
its content type after `<|constrain|>` (or bare):

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>
    {"city": "Paris"}<|call|>

`HarmonyScanner` turns such text, in pieces cut anywhere, into the same events as the whole text:
it holds back only a suffix that could still grow into a marker. The reasoning parser and the
tool parser named `openai` (vLLM's names) each read these events their own way.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from lmserve.api.tool_parsers.markers import find_marker, partial_marker_start

START, MESSAGE, CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
ENDS = ("<|end|>", "<|return|>", "<|call|>")
MARKERS = (START, MESSAGE, CHANNEL, "<|constrain|>", *ENDS)
FUNCTIONS = "functions."
_HEADER_MARKERS = (MESSAGE, START, *ENDS)
_BODY_MARKERS = (*ENDS, START, CHANNEL)
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*([^\s<]+)")


@dataclass(frozen=True, slots=True)
class Header:
    """What a message's header says: its channel and, for a tool call, its recipient."""

    channel: str | None
    recipient: str | None

    @classmethod
    def parse(cls, raw: str) -> Header:
        channel, recipient = _CHANNEL.search(raw), _RECIPIENT.search(raw)
        return cls(channel and channel[1], recipient and recipient[1])

    @property
    def function(self) -> str | None:
        """The function a tool call goes to (`to=functions.NAME`); None for other messages."""
        if self.recipient and self.recipient.startswith(FUNCTIONS):
            return self.recipient[len(FUNCTIONS) :] or None
        return None

    @property
    def is_reasoning(self) -> bool:
        """The analysis channel, and calls to the model's built-in tools (browser, python):
        the model's own work, not the answer."""
        return self.channel == "analysis" or (self.recipient is not None and not self.function)


@dataclass(frozen=True, slots=True)
class Loose:
    """Text outside any message."""

    text: str


@dataclass(frozen=True, slots=True)
class Opened:
    """A message's body begins."""

    header: Header


@dataclass(frozen=True, slots=True)
class Body:
    """The next text of the open message's body."""

    text: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The open message ended: at `marker` (one of ENDS), or None when a new message or the
    output's end cut it off."""

    marker: str | None


Event = Loose | Opened | Body | Closed


class _Phase(enum.Enum):
    LOOSE = enum.auto()
    HEADER = enum.auto()
    BODY = enum.auto()


class HarmonyScanner:
    """Events from an output fed in pieces; `finish()` settles what is held back (a header that
    never reached `<|message|>` is dropped, an open body is closed)."""

    def __init__(self) -> None:
        self._phase = _Phase.LOOSE
        self._pending = ""
        self._header = ""

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        text, self._pending = self._pending + text, ""
        pos = 0
        while pos < len(text):
            markers = self._markers()
            hit = find_marker(text, pos, markers)
            if hit is None:
                end = partial_marker_start(text, pos, markers)
                self._text(text[pos:end], events)
                self._pending = text[end:]
                return events
            index, marker = hit
            self._text(text[pos:index], events)
            self._marker(marker, events)
            pos = index + len(marker)
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        self._text(self._pending, events)
        self._pending = ""
        if self._phase is _Phase.BODY:
            events.append(Closed(None))
        self._phase, self._header = _Phase.LOOSE, ""
        return events

    def _markers(self) -> tuple[str, ...]:
        return {
            _Phase.LOOSE: MARKERS,
            _Phase.HEADER: _HEADER_MARKERS,
            _Phase.BODY: _BODY_MARKERS,
        }[self._phase]

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._phase is _Phase.LOOSE:
            events.append(Loose(text))
        elif self._phase is _Phase.HEADER:
            self._header += text
        else:
            events.append(Body(text))

    def _marker(self, marker: str, events: list[Event]) -> None:
        phase = self._phase
        if phase is _Phase.BODY:
            events.append(Closed(marker if marker in ENDS else None))
        if phase is _Phase.HEADER and marker == MESSAGE:
            events.append(Opened(Header.parse(self._header)))
            self._phase = _Phase.BODY
        elif marker == START:
            self._phase, self._header = _Phase.HEADER, ""
        elif marker == CHANNEL:  # the first message: the prompt already wrote its start
            self._phase, self._header = _Phase.HEADER, CHANNEL
        else:  # an end (a header cut short by one is dropped), or a stray marker
            self._phase, self._header = _Phase.LOOSE, ""
