"""The split both `deepseek_r1` and `qwen3` make: the output opens in the thinking, an optional
start tag at its very start is dropped, and the first end tag closes the thinking.

Rules (vLLM's, except where marked):
- A start tag at the very start of the output is dropped; anywhere else it is plain text. vLLM,
  which sees the tag's token, drops it anywhere in the thinking (`deepseek_r1` non-streaming also
  drops the text before it); here only text is seen, and a tag mid-thinking may be quoted.
- Text before the first end tag is reasoning and text after it is content, whitespace kept (vLLM
  does not strip the "\\n\\n" the models put after the end tag either).
- Later end tags are plain content, as in vLLM's `deepseek_r1`; its `qwen3` drops them.
- No end tag: the thinking never closed (cut off by `max_tokens`), so all of it is reasoning and
  content is `None`.
- Either side is `None` when empty (vLLM's `deepseek_r1` gives `""` reasoning when the output
  opens with the end tag; its `qwen3` gives `None`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lmserve.api.reasoning import (
    ReasoningDelta,
    ReasoningParser,
    ReasoningResult,
    ReasoningStream,
)


class ThinkTagReasoningParser(ReasoningParser):
    """Subclasses set `start_text` and `end_text`."""

    def extract(self, text: str) -> ReasoningResult:
        if self.reasoning_ended_in_prompt:
            return ReasoningResult(reasoning=None, content=text or None)
        body = text.removeprefix(self.start_text)
        reasoning, end, content = body.partition(self.end_text)
        if not end:
            return ReasoningResult(reasoning=body or None, content=None)
        return ReasoningResult(reasoning=reasoning or None, content=content or None)

    def stream(self) -> ThinkTagStream:
        return ThinkTagStream(
            start_text=self.start_text,
            end_text=self.end_text,
            phase=_Phase.CONTENT if self.reasoning_ended_in_prompt else _Phase.OPENING,
        )


class _Phase(enum.Enum):
    OPENING = enum.auto()  # the output so far could still be the start tag
    REASONING = enum.auto()
    CONTENT = enum.auto()


@dataclass(slots=True)
class ThinkTagStream(ReasoningStream):
    """Holds back only text that could still become a tag: while opening, an output that is so
    far a prefix of the start tag; while reasoning, the longest suffix that is a prefix of the
    end tag."""

    start_text: str
    end_text: str
    phase: _Phase
    held: str = ""

    def feed(self, delta_text: str) -> ReasoningDelta:
        text = self.held + delta_text
        self.held = ""
        if self.phase is _Phase.OPENING:
            if len(text) < len(self.start_text) and self.start_text.startswith(text):
                self.held = text
                return ReasoningDelta(reasoning=None, content=None)
            text = text.removeprefix(self.start_text)
            self.phase = _Phase.REASONING
        if self.phase is _Phase.CONTENT:
            return ReasoningDelta(reasoning=None, content=text or None)
        reasoning, end, content = text.partition(self.end_text)
        if end:
            self.phase = _Phase.CONTENT
            return ReasoningDelta(reasoning=reasoning or None, content=content or None)
        num_held = _partial_tag_len(text, self.end_text)
        self.held = text[len(text) - num_held :]
        return ReasoningDelta(reasoning=text[: len(text) - num_held] or None, content=None)

    def finish(self) -> ReasoningDelta:
        # Held text is only ever a tag that never completed: plain reasoning.
        reasoning, self.held = self.held, ""
        return ReasoningDelta(reasoning=reasoning or None, content=None)


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for num_chars in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:num_chars]):
            return num_chars
    return 0
