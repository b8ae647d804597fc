"""`check_streaming`: streamed deltas must add up to `extract()` for every chunking."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import pairwise

import pytest

from lmserve.api.reasoning import ReasoningDelta, ReasoningParser

NUM_RANDOM_CHUNKINGS = 20


def chunkings(text: str, seed: int = 0) -> Iterator[list[str]]:
    """Whole, one char at a time, every two-way split (so a tag is cut at each position), and
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


def stream_deltas(parser: ReasoningParser, chunks: list[str]) -> list[ReasoningDelta]:
    stream = parser.stream()
    return [*(stream.feed(chunk) for chunk in chunks), stream.finish()]


def joined(deltas: list[ReasoningDelta]) -> tuple[str, str]:
    return (
        "".join(d.reasoning or "" for d in deltas),
        "".join(d.content or "" for d in deltas),
    )


def _check(parser: ReasoningParser, text: str) -> None:
    expected = parser.extract(text)
    want = (expected.reasoning or "", expected.content or "")
    end = parser.end_text
    for chunks in chunkings(text):
        deltas = stream_deltas(parser, chunks)
        assert joined(deltas) == want, chunks
        for delta in deltas:
            assert delta.reasoning != "" and delta.content != "", (chunks, delta)
            assert end not in (delta.reasoning or ""), (chunks, delta)
            if end not in want[1]:
                assert end not in (delta.content or ""), (chunks, delta)


@pytest.fixture
def check_streaming() -> Callable[[ReasoningParser, str], None]:
    return _check
