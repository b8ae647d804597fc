from __future__ import annotations

import json
from typing import Any

import pytest

from lmserve.api.tool_parsers.qwen3_xml import Qwen3XmlToolParser
from tests.api.tool_parsers.conftest import calls_and_content

Calls = list[tuple[str, dict[str, Any]]]


def _tool(name: str, properties: dict[str, Any]) -> dict[str, Any]:
    parameters = {"type": "object", "properties": properties}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [
    _tool("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
    _tool(
        "search",
        {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "threshold": {"type": "number"},
            "exact": {"type": "boolean"},
            "filters": {"type": "object"},
            "fields": {"type": "array"},
            "cursor": {"type": ["string", "null"]},
            "page": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
    ),
]


def _call(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


# Shaped like Qwen3-Coder outputs.
CASES = [
    pytest.param(
        _call("write_file", ("path", "src/a.py"), ("content", 'def f():\n    return "<b>{x}</b>"')),
        [("write_file", {"path": "src/a.py", "content": 'def f():\n    return "<b>{x}</b>"'})],
        None,
        id="strings-with-markup-like-text",
    ),
    pytest.param(
        "I'll search.\n"
        + _call(
            "search",
            ("query", "café ☕"),
            ("limit", "10"),
            ("threshold", "0.5"),
            ("exact", "False"),
            ("filters", '{"lang": ["en", "fr"], "n": null}'),
            ("fields", "['title', 'url']"),
            ("cursor", "null"),
            ("page", "2"),
        ),
        [
            (
                "search",
                {
                    "query": "café ☕",
                    "limit": 10,
                    "threshold": 0.5,
                    "exact": False,
                    "filters": {"lang": ["en", "fr"], "n": None},
                    "fields": ["title", "url"],
                    "cursor": None,
                    "page": 2,
                },
            )
        ],
        "I'll search.\n",
        id="typed-by-schema",
    ),
    pytest.param(
        _call("unknown_tool", ("n", "42"), ("s", "hello"), ("o", '{"a": 1}'))
        + "\n"
        + _call("write_file", ("path", "b.txt"))
        + "\nDone.",
        [
            ("unknown_tool", {"n": 42, "s": "hello", "o": {"a": 1}}),
            ("write_file", {"path": "b.txt"}),
        ],
        "\nDone.",
        id="unknown-tool-json-or-string-then-second-call-then-text",
    ),
    pytest.param(
        "<tool_call>\n<function=write_file>\n<parameter=content>\n\n\nkeep inner newlines\n\n\n"
        "</parameter>\n</function>\n</tool_call>",
        [("write_file", {"content": "\n\nkeep inner newlines\n\n"})],
        None,
        id="only-one-framing-newline-cut",
    ),
    pytest.param(
        "<tool_call>\n<function=list_files>\n</function>\n</tool_call>",
        [("list_files", {})],
        None,
        id="no-parameters",
    ),
    pytest.param("Plain answer with a < b.", [], "Plain answer with a < b.", id="no-call"),
]

MALFORMED = [
    pytest.param(
        "<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n<parameter=content>\nx\n"
        "</function>\n</tool_call>",
        [("write_file", {"path": "a.py", "content": "x"})],
        None,
        id="missing-parameter-end-tags",
    ),
    pytest.param(
        "<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n"
        "<parameter=content>\nprint(1)\nprin",
        [("write_file", {"path": "a.py", "content": "print(1)\nprin"})],
        None,
        id="cut-in-a-value-keeps-it-as-far-as-it-got",
    ),
    pytest.param(
        "<tool_call>\n<function=search>\n<parameter=limit>\nlots\n</parameter>\n</function>",
        [("search", {"limit": "lots"})],
        None,
        id="untyped-value-falls-back-to-the-text",
    ),
    pytest.param("<tool_call>\n<funct", [], "<tool_call>\n<funct", id="cut-before-commit"),
    pytest.param(
        "<tool_call>\nnot a function</tool_call>",
        [],
        "<tool_call>\nnot a function</tool_call>",
        id="no-function-is-content",
    ),
    pytest.param(
        "<tool_call>\n<function=f>\nstray <parameter=bad\nname>x</parameter>\n</tool_call>",
        [("f", {})],
        None,
        id="stray-text-and-bad-parameter-tag-dropped",
    ),
]


def _extract(text: str) -> tuple[Calls, str | None]:
    return calls_and_content(Qwen3XmlToolParser(TOOLS), text)


@pytest.mark.parametrize(("text", "calls", "content"), CASES + MALFORMED)
def test_extract(text: str, calls: Calls, content: str | None) -> None:
    assert _extract(text) == (calls, content)


@pytest.mark.parametrize(("text", "calls", "content"), CASES)
def test_streaming_matches_extract(text: str, calls: Calls, content, check_streaming) -> None:
    check_streaming(Qwen3XmlToolParser(TOOLS), text)


@pytest.mark.parametrize(("text", "calls", "content"), MALFORMED)
def test_streaming_matches_extract_when_malformed(
    text: str, calls: Calls, content, check_streaming
) -> None:
    check_streaming(Qwen3XmlToolParser(TOOLS), text, well_formed=False)


def test_arguments_are_json_dumps_of_the_parameters() -> None:
    text = _call("search", ("query", 'say "hi"\tnow'), ("limit", "3"), ("extra", "ü"))
    (call,) = Qwen3XmlToolParser(TOOLS).extract(text).tool_calls
    expected = {"query": 'say "hi"\tnow', "limit": 3, "extra": "ü"}
    assert call.arguments == json.dumps(expected, ensure_ascii=False)


def test_without_tools_values_are_json_or_text() -> None:
    text = _call("search", ("limit", "3"), ("query", "3 apples"), ("flag", "true"))
    (call,) = Qwen3XmlToolParser([]).extract(text).tool_calls
    assert json.loads(call.arguments) == {"limit": 3, "query": "3 apples", "flag": True}


def test_string_values_stream_as_they_come() -> None:
    stream = Qwen3XmlToolParser(TOOLS).stream()
    first = stream.feed("<tool_call>\n<function=write_file>\n<parameter=content>\nnu")
    assert [(d.name, d.arguments) for d in first.tool_calls] == [("write_file", "")]
    # Still possibly `null`; then clearly text; the newline may be the framing one.
    assert [d.arguments for d in stream.feed("mber = 1\n").tool_calls] == [
        '{"content": "number = 1'
    ]
    assert [d.arguments for d in stream.feed("x\n</param").tool_calls] == ["\\nx"]
    assert [d.arguments for d in stream.feed("eter>\n</function>").tool_calls] == ['"}']


def test_typed_values_wait_for_the_whole_parameter() -> None:
    stream = Qwen3XmlToolParser(TOOLS).stream()
    stream.feed("<tool_call>\n<function=search>\n<parameter=limit>\n12")
    assert [d.arguments for d in stream.feed("3\n</parameter>").tool_calls] == ['{"limit": 123']
