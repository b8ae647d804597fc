from __future__ import annotations

import json
from typing import Any

import pytest

from lmserve.api.tool_parsers.llama3_json import Llama3JsonToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]

# Shaped like Llama 3.1 / 3.2 outputs with the JSON tool-calling template.
CASES = [
    pytest.param(
        '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", '
        '"unit": "Fahrenheit"}}',
        [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})],
        None,
        id="single",
    ),
    pytest.param(
        '<|python_tag|>{"name": "search", "parameters": {"query": "llama; \\"3.1\\" {release}"}}',
        [("search", {"query": 'llama; "3.1" {release}'})],
        None,
        id="python-tag-and-tricky-string",
    ),
    pytest.param(
        '{"name": "get_weather", "parameters": {"city": "Zürich"}}; '
        '{"name": "get_time", "arguments": {"tz": "Europe/Zurich", "fmt": ["H", "M"]}}',
        [
            ("get_weather", {"city": "Zürich"}),
            ("get_time", {"tz": "Europe/Zurich", "fmt": ["H", "M"]}),
        ],
        None,
        id="two-calls-semicolon-and-arguments-key",
    ),
    pytest.param(
        '\n\n{"type": "function", "name": "get_open_incidents", "parameters": {}}\n\n'
        "Would you like to know more?",
        [("get_open_incidents", {})],
        "\n\nWould you like to know more?",
        id="type-key-then-text",
    ),
    pytest.param(
        '{"name": "plot", "parameters": {"data": {"x": [1, 2.5, -3e-2], "y": null, "ok": true}}}',
        [("plot", {"data": {"x": [1, 2.5, -0.03], "y": None, "ok": True}})],
        None,
        id="nested",
    ),
    pytest.param(
        "The capital of France is Paris. {not a call}",
        [],
        "The capital of France is Paris. {not a call}",
        id="no-call",
    ),
]

MALFORMED = [
    pytest.param(
        '{"name": "Ada", "age": 36}',
        [],
        '{"name": "Ada", "age": 36}',
        id="json-answer-without-parameters-is-content",
    ),
    pytest.param(
        '<|python_tag|>brave_search.call(query="x")',
        [],
        '<|python_tag|>brave_search.call(query="x")',
        id="built-in-tool-syntax-is-content",
    ),
    pytest.param(
        '{"name": "f", "parameters": {"a": "b',
        [("f", {"a": "b"})],
        None,
        id="cut-in-arguments-closes-them",
    ),
    pytest.param('{"name": "f", "param', [], '{"name": "f", "param', id="cut-before-commit"),
    pytest.param(
        '{"name": "f", "parameters": {}}; {"answer": 42} and more',
        [("f", {})],
        None,
        id="object-after-calls-that-is-none-drops-the-rest",
    ),
    pytest.param('{"name": "f", "parameters": {}};  ', [("f", {})], None, id="trailing-separator"),
    pytest.param("<|python_tag|>", [], "<|python_tag|>", id="lone-tag"),
]


def _extract(text: str) -> tuple[Calls, str | None]:
    return calls_and_content(Llama3JsonToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES + MALFORMED)
def test_extract(text: str, calls: Calls, content: str | None) -> None:
    assert _extract(text) == (calls, content)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_streaming_matches_extract(text: str, calls: Calls, content, check_streaming) -> None:
    check_streaming(Llama3JsonToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), MALFORMED)
def test_streaming_matches_extract_when_malformed(
    text: str, calls: Calls, content, check_streaming
) -> None:
    check_streaming(Llama3JsonToolParser([]), text, well_formed=False)


def test_arguments_are_the_raw_json_text() -> None:
    text = '{"name": "f", "parameters": {"a":1, "b" : [ ]}}'
    (call,) = Llama3JsonToolParser([]).extract(text).tool_calls
    assert call.arguments == '{"a":1, "b" : [ ]}'


def test_parameters_wins_over_a_later_arguments_key() -> None:
    text = '{"name": "f", "parameters": {"a": 1}, "arguments": {"b": 2}}'
    (call,) = Llama3JsonToolParser([]).extract(text).tool_calls
    assert json.loads(call.arguments) == {"a": 1}


def test_content_flows_once_the_output_is_not_a_call() -> None:
    stream = Llama3JsonToolParser([]).stream()
    assert stream.feed("  <|python").content is None  # could still be the tag
    assert stream.feed("_ta").content is None
    assert stream.feed("x hello").content == "  <|python_tax hello"
