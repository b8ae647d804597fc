"""`--tool-call-parser openai`: gpt-oss's calls, read from the raw harmony output or from what
the `openai` reasoning parser leaves as content."""

from __future__ import annotations

from typing import Any

import pytest

from lmserve.api.reasoning.gpt_oss import GptOssReasoningParser
from lmserve.api.tool_parsers.gpt_oss import GptOssToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]
WEATHER = {"city": "Paris", "unit": "celsius"}

CASES = [
    pytest.param(
        "<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>"
        "commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"city": "Paris", "unit": "celsius"}<|call|>',
        [("get_weather", WEATHER)],
        None,
        id="one-call-after-analysis",
    ),
    pytest.param(
        "<|channel|>commentary<|message|>Let me check both.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
        '{"city": "Paris", "unit": "celsius"}<|call|>'
        "<|start|>assistant<|channel|>commentary to=functions.add <|constrain|>json<|message|>"
        ' {"a": 1, "b": [2, {"c": "}"}]}<|call|>',
        [("get_weather", WEATHER), ("add", {"a": 1, "b": [2, {"c": "}"}]})],
        "Let me check both.",
        id="preamble-two-calls-both-header-forms",
    ),
    pytest.param(
        "<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Paris is the capital.<|return|>",
        [],
        "Paris is the capital.",
        id="answer-without-calls",
    ),
    pytest.param(
        '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Par',
        [("get_weather", {"city": "Par"})],
        None,
        id="cut-off-arguments-closed",
    ),
    pytest.param(
        "<|channel|>commentary to=functions.get_weather<|message|>Paris please<|call|>",
        [],
        "Paris please",
        id="a-body-that-is-not-an-object-is-content",
    ),
    pytest.param(
        '<|channel|>commentary to=functions.f<|message|>{"a": 1} trailing<|call|>'
        "<|start|>assistant<|channel|>analysis to=python<|message|>print(1)<|call|>",
        [("f", {"a": 1})],
        None,
        id="after-the-object-and-built-in-tools-dropped",
    ),
]


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_calls_and_content(text: str, calls: Calls, content: str | None, check_streaming) -> None:
    parser = GptOssToolParser([])
    assert calls_and_content(parser, text) == (calls, content)
    check_streaming(parser, text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_the_reasoning_parsers_content_gives_the_same_calls(text, calls, content) -> None:
    """Behind `--reasoning-parser openai`, the calls it passes on read the same."""
    left = GptOssReasoningParser().extract(text).content or ""
    assert calls_and_content(GptOssToolParser([]), left)[0] == calls
