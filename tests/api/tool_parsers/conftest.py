"""`check_streaming`: streamed deltas must add up to `extract()` for every chunking, with each
call's id and name sent once and nothing sent that a later delta would have to take back."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import pytest

from lmserve.api.tool_parsers import ExtractedToolCalls, StreamDelta, ToolParser

NUM_RANDOM_CHUNKINGS = 10
# Markup that must never reach content when the output is well formed.
MARKUP = (
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|python_tag|>",
    "<|python_start|>",
    "<|python_end|>",
    "<function=",
    "<parameter=",
    "<|channel|>",
    "<|message|>",
    "<|start|>",
    "<|call|>",
)


def chunkings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """Whole, one char at a time, every two-way split (so markup is cut at each position), and
    seeded random chunkings that include empty chunks."""
    yield [text]
    yield list(text)
    for cut in range(len(text) + 1):
        yield [text[:cut], text[cut:]]
    rng = random.Random(seed)
    for _ in range(NUM_RANDOM_CHUNKINGS):
        num_cuts = rng.randint(0, max(1, len(text) // 3))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(num_cuts))
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in pairwise(bounds)]


@dataclass
class Message:
    """What a client holds: content, and each call's name and arguments."""

    content: str = ""
    names: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, result: ExtractedToolCalls) -> Message:
        return cls(
            result.content or "",
            [call.name for call in result.tool_calls],
            [call.arguments for call in result.tool_calls],
        )


def rebuild(deltas: list[StreamDelta], want: Message, well_formed: bool) -> Message:
    """Apply `deltas` as a client would, checking the protocol after each one: a call's id and
    name come once, on its first delta; indices run in order; no empty pieces; and what has
    arrived so far is a prefix of `want` (never taken back). With `well_formed`, content
    never carries markup."""
    got = Message()
    ids: list[str] = []
    for delta in deltas:
        assert delta.content != "", delta
        if delta.content is not None:
            got.content += delta.content
            if well_formed:
                assert not any(m in delta.content for m in MARKUP), delta
        for call in delta.tool_calls:
            if call.index == len(ids):
                assert call.id is not None and call.name is not None, call
                ids.append(call.id)
                got.names.append(call.name)
                got.arguments.append("")
            else:
                assert call.index == len(ids) - 1, call
                assert call.id is None and call.name is None and call.arguments, call
            got.arguments[call.index] += call.arguments
        assert want.content.startswith(got.content), (got, want)
        assert got.names == want.names[: len(got.names)], (got, want)
        for arguments, final in zip(got.arguments, want.arguments, strict=False):
            assert final.startswith(arguments), (got, want)
    assert len(set(ids)) == len(ids)
    return got


def stream(parser: ToolParser, chunks: list[str]) -> list[StreamDelta]:
    s = parser.stream()
    return [*(s.feed(chunk) for chunk in chunks), s.finish()]


def _check(parser: ToolParser, text: str, well_formed: bool = True) -> None:
    result = parser.extract(text)
    assert result.content is None or result.content.strip()
    for call in result.tool_calls:
        assert isinstance(json.loads(call.arguments), dict), call
    want = Message.of(result)
    for chunks in chunkings(text):
        assert rebuild(stream(parser, chunks), want, well_formed) == want, chunks


@pytest.fixture
def check_streaming() -> Callable[..., None]:
    """`check_streaming(parser, text, well_formed=True)`."""
    return _check


def calls_and_content(parser: ToolParser, text: str) -> tuple[list[tuple[str, Any]], str | None]:
    """A finished output's calls as (name, parsed arguments), and its content."""
    result = parser.extract(text)
    return [(c.name, json.loads(c.arguments)) for c in result.tool_calls], result.content
