"""Finding markup (`<tool_call>`, `[TOOL_CALLS]`) in text that may end in the middle of it."""

from __future__ import annotations

import re


def find_marker(text: str, start: int, markers: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest of `markers` in `text[start:]`, as (index, marker)."""
    best: tuple[int, str] | None = None
    for marker in markers:
        index = text.find(marker, start)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, marker)
    return best


def partial_marker_start(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Where a suffix of `text[start:]` that could still grow into one of `markers` begins;
    `len(text)` when none could. Text from there on must be held back."""
    longest = max(len(marker) for marker in markers)
    for index in range(max(start, len(text) - longest + 1), len(text)):
        tail = text[index:]
        if any(marker.startswith(tail) for marker in markers):
            return index
    return len(text)


def match_end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where `pattern` stops matching at `pos`; for patterns whose parts are all optional."""
    match = pattern.match(text, pos)
    assert match is not None
    return match.end()
