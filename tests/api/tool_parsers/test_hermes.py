from __future__ import annotations

import json
import re
from typing import Any

import pytest

from lmserve.api.tool_parsers.hermes import HermesToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]

# Shaped like Qwen2.5 / Hermes 2 Pro outputs.
CASES = [
    pytest.param(
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": '
        '"San Francisco, CA, USA"}}\n</tool_call>',
        [("get_current_temperature", {"location": "San Francisco, CA, USA"})],
        None,
        id="single",
    ),
    pytest.param(
        "Let me check both cities.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        "</tool_call>\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "São Paulo", "unit": "celsius"}}\n'
        "</tool_call>",
        [
            ("get_weather", {"city": "Paris", "unit": "celsius"}),
            ("get_weather", {"city": "São Paulo", "unit": "celsius"}),
        ],
        "Let me check both cities.\n",
        id="content-then-two-calls",
    ),
    pytest.param(
        '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n'
        "</tool_call>",
        [("get_stock_fundamentals", {"symbol": "TSLA"})],
        None,
        id="hermes-arguments-before-name",
    ),
    pytest.param(
        '<tool_call>\n{"name": "run", "arguments": {"code": "if (a) { print(\\"}{\\") }", '
        '"args": [1, -2.5e3, true, null, {"k": []}], "note": "日本語 😀 \\u00e9"}}\n</tool_call>',
        [
            (
                "run",
                {
                    "code": 'if (a) { print("}{") }',
                    "args": [1, -2500.0, True, None, {"k": []}],
                    "note": "日本語 😀 é",
                },
            )
        ],
        None,
        id="braces-escapes-unicode-nested",
    ),
    pytest.param(
        '<tool_call>\n{"name": "list_files", "arguments": {}}\n</tool_call>\nDone.',
        [("list_files", {})],
        "\nDone.",
        id="no-arguments-then-text",
    ),
    pytest.param(
        "The answer is 4. In XML a <tool> tag looks like <tool_cal.",
        [],
        "The answer is 4. In XML a <tool> tag looks like <tool_cal.",
        id="no-call",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": {"a": 1}}',
        [("f", {"a": 1})],
        None,
        id="unclosed-final-block-with-complete-json",
    ),
]

MALFORMED = [
    pytest.param(
        'Sure.\n<tool_call>\n{"name": "write", "arguments": {"text": "Once upon a ti',
        [("write", {"text": "Once upon a ti"})],
        "Sure.\n",
        id="cut-in-arguments-closes-them",
    ),
    pytest.param(
        '<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": 2.',
        [("f", {"a": [1, {}]})],
        None,
        id="cut-in-number-keeps-what-is-certain",
    ),
    pytest.param(
        '<tool_call>\n{"name": "get_wea',
        [],
        '<tool_call>\n{"name": "get_wea',
        id="cut-before-commit-is-content",
    ),
    pytest.param(
        "Hi <tool_call>not json</tool_call> bye",
        [],
        "Hi <tool_call>not json</tool_call> bye",
        id="not-json-is-content",
    ),
    pytest.param(
        '<tool_call>{"name": "Ada", "age": 3}</tool_call>',
        [],
        '<tool_call>{"name": "Ada", "age": 3}</tool_call>',
        id="object-without-arguments-is-content",
    ),
    pytest.param(
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        [],
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
        id="string-arguments-are-content",
    ),
    pytest.param(
        '<tool_call>{"name": "f", "arguments": {"a": 1,, "b": 2}}</tool_call>after',
        [("f", {"a": 1})],
        "after",
        id="invalid-json-after-commit-drops-the-rest-of-the-block",
    ),
    pytest.param(
        '<tool_call>{"name": "f", "arguments": {}} junk </tool_call>',
        [("f", {})],
        None,
        id="junk-before-the-end-tag-is-dropped",
    ),
    pytest.param(
        '<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": {}}',
        [("f", {}), ("g", {})],
        None,
        id="missing-end-tag-before-the-next-block",
    ),
    pytest.param("<tool_call>", [], "<tool_call>", id="lone-start-tag"),
]


def _extract(text: str) -> tuple[Calls, str | None]:
    return calls_and_content(HermesToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES + MALFORMED)
def test_extract(text: str, calls: Calls, content: str | None) -> None:
    assert _extract(text) == (calls, content)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_streaming_matches_extract(text: str, calls: Calls, content, check_streaming) -> None:
    check_streaming(HermesToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), MALFORMED)
def test_streaming_matches_extract_when_malformed(
    text: str, calls: Calls, content, check_streaming
) -> None:
    check_streaming(HermesToolParser([]), text, well_formed=False)


def test_arguments_are_the_raw_json_text() -> None:
    text = '<tool_call>\n{"name": "f", "arguments":  {"b" :1,\n "a": "\\u00e9"} }\n</tool_call>'
    (call,) = HermesToolParser([]).extract(text).tool_calls
    assert call.arguments == '{"b" :1,\n "a": "\\u00e9"}'


def test_raw_control_characters_in_strings_are_escaped() -> None:
    text = '<tool_call>{"name": "f", "arguments": {"code": "a\n\tb"}}</tool_call>'
    (call,) = HermesToolParser([]).extract(text).tool_calls
    assert call.arguments == '{"code": "a\\n\\tb"}'
    assert json.loads(call.arguments) == {"code": "a\n\tb"}


def test_call_ids_are_openai_style_and_unique() -> None:
    block = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    calls = HermesToolParser([]).extract(block * 3).tool_calls
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in calls)
    assert len({c.id for c in calls}) == 3


def test_name_waits_for_the_arguments_and_fragments_flow() -> None:
    stream = HermesToolParser([]).stream()
    assert stream.feed('<tool_call>\n{"name": "get_weather", ').tool_calls == []
    first = stream.feed('"arguments": {"city": "Pa')
    assert [(d.index, d.name, d.arguments) for d in first.tool_calls] == [
        (0, "get_weather", '{"city": "Pa')
    ]
    assert first.content is None
    assert [d.arguments for d in stream.feed('ris"}}\n</tool_call>').tool_calls] == ['ris"}']
    assert stream.finish().tool_calls == []


def test_holds_back_only_a_possible_start_tag() -> None:
    stream = HermesToolParser([]).stream()
    assert stream.feed("a <tool_c").content == "a "
    assert stream.feed("x").content == "<tool_cx"
    assert stream.feed(" <tool_call").content == " "
    assert stream.finish().content == "<tool_call"
