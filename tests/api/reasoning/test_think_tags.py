from __future__ import annotations

import pytest

from lmserve.api.reasoning import ReasoningDelta
from lmserve.api.reasoning.think_tags import ThinkTagReasoningParser


class Tags(ThinkTagReasoningParser):
    start_text = "<think>"
    end_text = "</think>"


def _partial_tag_suffix(text: str, tag: str) -> str:
    return next((tag[:n] for n in range(len(tag) - 1, 0, -1) if text.endswith(tag[:n])), "")


@pytest.mark.parametrize(
    "text",
    [
        "<think>\nab<c </t </think>\n\nx<y</think>z",
        "<<think>a</thi</think>",
        "<thi",
        "plain </think",
    ],
)
def test_holds_back_only_a_possible_tag(text: str) -> None:
    """After each char, what is not yet released is exactly the part that could still be a tag:
    the whole output while it is a prefix of the start tag, else the longest suffix of the
    reasoning that is a prefix of the end tag, and nothing once in the content."""
    parser = Tags()
    stream = parser.stream()
    released_reasoning = released_content = ""
    for num_chars, char in enumerate(text, start=1):
        delta = stream.feed(char)
        released_reasoning += delta.reasoning or ""
        released_content += delta.content or ""
        prefix = text[:num_chars]
        whole = parser.extract(prefix)
        if released_content or whole.content is not None or parser.end_text in prefix:
            assert (released_reasoning, released_content) == (
                whole.reasoning or "",
                whole.content or "",
            )
            continue
        assert not released_content
        held = (whole.reasoning or "").removeprefix(released_reasoning)
        assert released_reasoning + held == (whole.reasoning or "")
        if len(prefix) < len(parser.start_text) and parser.start_text.startswith(prefix):
            assert held == prefix
        else:
            assert held == _partial_tag_suffix(whole.reasoning or "", parser.end_text)


def test_delta_sides_are_none_without_new_text() -> None:
    stream = Tags().stream()
    assert stream.feed("<thi") == ReasoningDelta(None, None)
    assert stream.feed("nk>") == ReasoningDelta(None, None)
    assert stream.feed("plan</") == ReasoningDelta("plan", None)
    assert stream.feed("think>") == ReasoningDelta(None, None)
    assert stream.feed("") == ReasoningDelta(None, None)
    assert stream.feed("\n\nok") == ReasoningDelta(None, "\n\nok")
    assert stream.finish() == ReasoningDelta(None, None)


def test_tag_in_one_delta_splits_it() -> None:
    stream = Tags().stream()
    assert stream.feed("a</think>b") == ReasoningDelta("a", "b")


def test_finish_releases_an_unfinished_tag_as_reasoning() -> None:
    stream = Tags().stream()
    assert stream.feed("so </thin") == ReasoningDelta("so ", None)
    assert stream.finish() == ReasoningDelta("</thin", None)


def test_reasoning_ended_in_prompt_streams_everything_as_content() -> None:
    stream = Tags(reasoning_ended_in_prompt=True).stream()
    assert stream.feed("<thi") == ReasoningDelta(None, "<thi")
    assert stream.feed("nk>a</th") == ReasoningDelta(None, "nk>a</th")
    assert stream.feed("ink>b") == ReasoningDelta(None, "ink>b")
    assert stream.feed("") == ReasoningDelta(None, None)
    assert stream.finish() == ReasoningDelta(None, None)
