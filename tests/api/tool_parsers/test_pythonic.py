from __future__ import annotations

import json
from typing import Any

import pytest

from lmserve.api.tool_parsers.pythonic import PythonicToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]

# Shaped like Llama 3.2 / Llama 4 pythonic outputs.
CASES = [
    pytest.param(
        '[get_weather(city="San Francisco", metric="celsius")]',
        [("get_weather", {"city": "San Francisco", "metric": "celsius"})],
        None,
        id="single",
    ),
    pytest.param(
        "[get_weather(city='Tokyo', days=3), get_time(), register_user(name='Ada', "
        "age=36, admin=False, tags=None)]",
        [
            ("get_weather", {"city": "Tokyo", "days": 3}),
            ("get_time", {}),
            ("register_user", {"name": "Ada", "age": 36, "admin": False, "tags": None}),
        ],
        None,
        id="three-calls",
    ),
    pytest.param(
        '<|python_start|>[run(code="print(\\"a, b)\\")", data={"k": [1, (2, 3)], "é": "}]"}, '
        "ratio=-1.5e3)]<|python_end|>",
        [
            (
                "run",
                {"code": 'print("a, b)")', "data": {"k": [1, [2, 3]], "é": "}]"}, "ratio": -1500.0},
            )
        ],
        None,
        id="tags-escapes-brackets-in-strings-nested",
    ),
    pytest.param(
        '[translate(text="日本語 😀", target = "fr"  ,  )]\n',
        [("translate", {"text": "日本語 😀", "target": "fr"})],
        None,
        id="unicode-spacing-trailing-comma",
    ),
    pytest.param(
        '[write(text="""two\nlines, (and) more""")]',
        [("write", {"text": "two\nlines, (and) more"})],
        None,
        id="triple-quoted",
    ),
    pytest.param(
        "The list [1, 2, 3] has three items.",
        [],
        "The list [1, 2, 3] has three items.",
        id="no-call",
    ),
    pytest.param(
        "I'd call get_weather(city='Paris') for that.",
        [],
        "I'd call get_weather(city='Paris') for that.",
        id="call-not-opening-the-output",
    ),
]

MALFORMED = [
    pytest.param("[Note(s) below]", [], "[Note(s) below]", id="prose-in-brackets"),
    pytest.param(
        '[f(a=1, b="unfinished',
        [("f", {"a": 1})],
        None,
        id="cut-in-a-value-keeps-earlier-keywords",
    ),
    pytest.param('[f(a="x', [], '[f(a="x', id="cut-before-commit-is-content"),
    pytest.param(
        "[f(a=1), g(b=os.getcwd())] tail",
        [("f", {"a": 1})],
        None,
        id="non-literal-after-a-call-drops-the-rest",
    ),
    pytest.param("[f(a={1, 2})]", [], "[f(a={1, 2})]", id="value-with-no-json-form"),
    pytest.param(
        '[f(a=1)] and then "text"', [("f", {"a": 1})], ' and then "text"', id="text-after-list"
    ),
    pytest.param("[f(1)]", [], "[f(1)]", id="positional-argument"),
]


def _extract(text: str) -> tuple[Calls, str | None]:
    return calls_and_content(PythonicToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES + MALFORMED)
def test_extract(text: str, calls: Calls, content: str | None) -> None:
    assert _extract(text) == (calls, content)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_streaming_matches_extract(text: str, calls: Calls, content, check_streaming) -> None:
    check_streaming(PythonicToolParser([]), text)


@pytest.mark.parametrize(("text", "calls", "content"), MALFORMED)
def test_streaming_matches_extract_when_malformed(
    text: str, calls: Calls, content, check_streaming
) -> None:
    check_streaming(PythonicToolParser([]), text, well_formed=False)


def test_arguments_are_json_dumps_of_the_keywords() -> None:
    text = "[f(b='é', a=[1,2], c={'x': None})]"
    (call,) = PythonicToolParser([]).extract(text).tool_calls
    expected = {"b": "é", "a": [1, 2], "c": {"x": None}}
    assert call.arguments == json.dumps(expected, ensure_ascii=False)


def test_arguments_stream_a_keyword_at_a_time() -> None:
    stream = PythonicToolParser([]).stream()
    assert stream.feed('[get_weather(city="Par').tool_calls == []
    first = stream.feed('is", da')
    assert [(d.name, d.arguments) for d in first.tool_calls] == [
        ("get_weather", '{"city": "Paris"')
    ]
    assert [d.arguments for d in stream.feed("ys=3)").tool_calls] == [', "days": 3}']
