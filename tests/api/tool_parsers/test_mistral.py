from __future__ import annotations

import re
from typing import Any

import pytest

from lmserve.api.tool_parsers.mistral import MistralToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]

# Shaped like Mistral 7B v0.3 (list form) and Mistral Small 3.x / Devstral (v11 form) outputs.
CASES = [
    pytest.param(
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3.5, "b": 4}}]',
        [("add", {"a": 3.5, "b": 4})],
        None,
        id="list-single",
    ),
    pytest.param(
        '[TOOL_CALLS]  [ {"name":"add" , "arguments" : {"a": 3, "b": 4} } ]',
        [("add", {"a": 3, "b": 4})],
        None,
        id="list-spaced",
    ),
    pytest.param(
        'Hello[TOOL_CALLS] [{"arguments": {"name": "John Doe"}, "name": "get_age"}, '
        '{"name": "get_current_weather", "arguments": {"city": "San Francisco", "state": "CA"}}]'
        "\nextra trailing data",
        [
            ("get_age", {"name": "John Doe"}),
            ("get_current_weather", {"city": "San Francisco", "state": "CA"}),
        ],
        "Hello\nextra trailing data",
        id="list-content-around-two-calls-arguments-first",
    ),
    pytest.param(
        '[TOOL_CALLS]get_current_weather[ARGS]{"city": "Kraków", "unit": "celsius"}',
        [("get_current_weather", {"city": "Kraków", "unit": "celsius"})],
        None,
        id="v11-single",
    ),
    pytest.param(
        'Let me compute.[TOOL_CALLS]add{"a": 3.5, "b": 4}[TOOL_CALLS]multiply[ARGS]{"a": 3, '
        '"b": [6, {"c": "}]"}]}',
        [("add", {"a": 3.5, "b": 4}), ("multiply", {"a": 3, "b": [6, {"c": "}]"}]})],
        "Let me compute.",
        id="v11-two-calls-with-and-without-args-token",
    ),
    pytest.param(
        '[TOOL_CALLS]bash[CALL_ID]a1b2c3d4e[ARGS]{"command": "print(\\"hello world!\\")\\n'
        "re.compile(r'{}')\"}",
        [("bash", {"command": "print(\"hello world!\")\nre.compile(r'{}')"})],
        None,
        id="v11-call-id-and-escapes",
    ),
    pytest.param("This is a test [TOOL_CALL", [], "This is a test [TOOL_CALL", id="no-call"),
]

MALFORMED = [
    pytest.param(
        'hi{hi[TOOL_CALLS]bash{"command": "print(\\"hello world!\\")\\nre.compile(r\'{}\')',
        [("bash", {"command": "print(\"hello world!\")\nre.compile(r'{}')"})],
        "hi{hi",
        id="v11-cut-in-arguments-closes-them",
    ),
    pytest.param(
        "[TOOL_CALLS] not json at all",
        [],
        "[TOOL_CALLS] not json at all",
        id="not-a-call-is-content",
    ),
    pytest.param("[TOOL_CALLS]toolname_no_args", [], "[TOOL_CALLS]toolname_no_args", id="no-args"),
    pytest.param(
        '[TOOL_CALLS][{"name": "f", "arguments": {}}, oops] after[TOOL_CALLS]g{}',
        [("f", {}), ("g", {})],
        None,
        id="broken-element-after-a-call-skips-to-the-next-marker",
    ),
    pytest.param(
        '[TOOL_CALLS]f{"a": tru}, text[TOOL_CALLS]g{} end',
        [("f", {}), ("g", {})],
        " end",
        id="invalid-arguments-skip-to-the-next-marker",
    ),
    pytest.param("[TOOL_CALLS][]", [], "[TOOL_CALLS][]", id="empty-list"),
    pytest.param("[TOOL_CALLS]", [], "[TOOL_CALLS]", id="lone-marker"),
]


def _extract(text: str) -> tuple[Calls, str | None]:
    return calls_and_content(MistralToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES + MALFORMED)
def test_extract(text: str, calls: Calls, content: str | None) -> None:
    assert _extract(text) == (calls, content)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_streaming_matches_extract(text: str, calls: Calls, content, check_streaming) -> None:
    check_streaming(MistralToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), MALFORMED)
def test_streaming_matches_extract_when_malformed(
    text: str, calls: Calls, content, check_streaming
) -> None:
    check_streaming(MistralToolParser([]), text, well_formed=False)


def test_call_ids_are_nine_alphanumerics() -> None:
    calls = MistralToolParser([]).extract("[TOOL_CALLS]f{}[TOOL_CALLS]g{}").tool_calls
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in calls)


def test_arguments_are_the_raw_json_text() -> None:
    (call,) = MistralToolParser([]).extract('[TOOL_CALLS]f[ARGS] {"a" :1} ').tool_calls
    assert call.arguments == '{"a" :1}'


def test_v11_arguments_stream_as_they_come() -> None:
    stream = MistralToolParser([]).stream()
    assert stream.feed("[TOOL_CALLS]get_w").tool_calls == []
    first = stream.feed('eather[ARGS]{"city": "Par')
    assert [(d.name, d.arguments) for d in first.tool_calls] == [("get_weather", '{"city": "Par')]
    assert [d.arguments for d in stream.feed('is"}').tool_calls] == ['is"}']
