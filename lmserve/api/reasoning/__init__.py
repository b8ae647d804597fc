"""Reasoning parsers (`--reasoning-parser`): split a reasoning model's output into the thinking
(`reasoning`) and the answer (`content`), whole or streamed.

A side is `None` whenever it has no text, never `""`, in results and in deltas alike, so the
streamed deltas of either side, concatenated with `None` read as `""`, always equal `extract()`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class ReasoningResult:
    """A whole output, split."""

    reasoning: str | None
    content: str | None


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """The text one `feed()` releases; `None` on a side with no new text."""

    reasoning: str | None
    content: str | None


class ReasoningStream(ABC):
    """Splits one output as it streams in; one per output (choice), never reused."""

    @abstractmethod
    def feed(self, delta_text: str) -> ReasoningDelta:
        """Take the next piece of output; may hold back a suffix that could still be a tag."""

    @abstractmethod
    def finish(self) -> ReasoningDelta:
        """Release what is held back (a tag that never completed is plain text)."""


class ReasoningParser(ABC):
    """Knows one model family's thinking tags.

    `reasoning_ended_in_prompt=True` says the prompt already closed the thinking (see
    `reasoning_ended`), so the whole output is content, taken verbatim, in `extract` and `stream`.
    """

    start_text: ClassVar[str]
    end_text: ClassVar[str]
    # Whether the tags are special tokens the detokenizer must keep.
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, *, reasoning_ended_in_prompt: bool = False) -> None:
        self.reasoning_ended_in_prompt = reasoning_ended_in_prompt

    @abstractmethod
    def extract(self, text: str) -> ReasoningResult:
        """Split a finished output."""

    @abstractmethod
    def stream(self) -> ReasoningStream:
        """A fresh streaming splitter that agrees with `extract` for any chunking."""

    @classmethod
    def reasoning_ended(cls, prompt_text: str) -> bool:
        """Whether the prompt itself closed the thinking, so generation starts in the answer.

        True when the last `end_text` in the prompt comes after the last `start_text`, as when
        Qwen3's template with `enable_thinking=False` ends the prompt with
        `<think>\\n\\n</think>\\n\\n`. The server passes this to `reasoning_ended_in_prompt`, and
        the engine uses the same rule to apply a structured-output grammar from the first token.
        This is vLLM's rule (`is_reasoning_end` run over the prompt).

        NOTE: the rule sees only the last tag, history included: a closed think block in an
        earlier turn with no tag after it also counts as closed.
        """
        return prompt_text.rfind(cls.end_text) > prompt_text.rfind(cls.start_text)


# Imported on first use: the parser modules import the base types above from this package.
_PARSER_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "deepseek_r1": "lmserve.api.reasoning.deepseek_r1:DeepSeekR1ReasoningParser",
        "openai": "lmserve.api.reasoning.gpt_oss:GptOssReasoningParser",
        "qwen3": "lmserve.api.reasoning.qwen3:Qwen3ReasoningParser",
    }
)
REASONING_PARSERS: tuple[str, ...] = tuple(_PARSER_PATHS)


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name` (the `--reasoning-parser` value)."""
    path = _PARSER_PATHS.get(name)
    if path is None:
        raise ValueError(
            f"unknown reasoning parser {name!r}; known parsers: {', '.join(REASONING_PARSERS)}"
        )
    module_name, _, class_name = path.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
