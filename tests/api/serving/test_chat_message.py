"""Reasoning, content and tool calls of one chat choice: whole text vs streamed at every split."""

from __future__ import annotations

import json

import pytest

from lmserve.api.reasoning import get_reasoning_parser
from lmserve.api.serving.chat_message import MessageParser, ToolMode
from lmserve.api.tool_parsers import get_tool_parser

HERMES_TWO_CALLS = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
)


# (reasoning, content, [(name, arguments)]) as a client sees a message
Message = tuple[str | None, str | None, list[tuple[str, str]]]


def streamed(parser: MessageParser, pieces: list[str]) -> Message:
    """What a client rebuilds from the deltas; checks OpenAI's once-only id and name rule."""
    stream = parser.stream()
    reasoning, content = "", ""
    calls: dict[int, list[str]] = {}
    deltas = [stream.feed(p) for p in pieces] + [stream.finish()]
    for delta in deltas:
        reasoning += delta.reasoning or ""
        content += delta.content or ""
        for call in delta.tool_calls:
            if call.index not in calls:
                assert call.id and call.name
                calls[call.index] = [call.name, ""]
            else:
                assert call.id is None and call.name is None
            calls[call.index][1] += call.arguments
    assert stream.called == bool(calls)
    return reasoning or None, content or None, [(calls[i][0], calls[i][1]) for i in sorted(calls)]


def whole(parser: MessageParser, text: str) -> Message:
    parsed = parser.parse(text)
    return parsed.reasoning, parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls]


def splits(text: str) -> list[list[str]]:
    return [list(text)] + [[text[:i], text[i:]] for i in range(len(text) + 1)]


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_calls_with_reasoning_stream_as_they_parse(parallel: bool) -> None:
    text = "<think>Weather, then a sum.</think>\n\n" + HERMES_TWO_CALLS
    parser = MessageParser(
        get_reasoning_parser("qwen3")(),
        ToolMode("auto", parser=get_tool_parser("hermes")([]), parallel=parallel),
    )
    expected = whole(parser, text)
    assert expected[0] == "Weather, then a sum."
    assert [name for name, _ in expected[2]] == (
        ["get_weather", "add"] if parallel else ["get_weather"]
    )
    for pieces in splits(text):
        assert streamed(parser, pieces) == expected


def test_named_choice_streams_the_arguments_as_generated() -> None:
    text = '{"a": 1, "b": 22}'
    parser = MessageParser(None, ToolMode("named", name="add"))
    expected = whole(parser, text)
    assert expected == (None, None, [("add", text)])
    for pieces in splits(text):
        assert streamed(parser, pieces) == expected


def test_required_array_becomes_calls_and_a_cut_one_keeps_its_whole_calls() -> None:
    """max_tokens can cut the forced array: the calls completed before the cut come back
    (finish_reason stays "length"); with none complete, the text stays content."""
    parser = MessageParser(None, ToolMode("required"))
    text = '[{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "f", "parameters": {}}]'
    expected = whole(parser, text)
    assert [(n, json.loads(a)) for n, a in expected[2]] == [
        ("add", {"a": 1, "b": 2}),
        ("f", {}),
    ]
    cut = text[:30]
    assert whole(parser, cut) == (None, cut, [])
    after_one = text[: text.index('{"name": "f"') + 5]
    assert [(n, json.loads(a)) for n, a in whole(parser, after_one)[2]] == [
        ("add", {"a": 1, "b": 2})
    ]
    assert whole(parser, after_one)[1] is None
    for source in (text, cut, after_one):
        for pieces in splits(source)[:5]:
            assert streamed(parser, pieces) == whole(parser, source)


GPT_OSS_CALLS = (
    "<|channel|>analysis<|message|>Weather, then a sum.<|end|>"
    "<|start|>assistant<|channel|>commentary<|message|>One moment.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
    "<|start|>assistant to=functions.add<|channel|>commentary json<|message|>"
    '{"a": 1, "b": 2}<|call|>'
)


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_oss_channels_and_calls_stream_as_they_parse(parallel: bool) -> None:
    """`--reasoning-parser openai --tool-call-parser openai`: analysis is reasoning, the
    preamble is content, each function message is a call."""
    parser = MessageParser(
        get_reasoning_parser("openai")(),
        ToolMode("auto", parser=get_tool_parser("openai")([]), parallel=parallel),
    )
    expected = whole(parser, GPT_OSS_CALLS)
    calls = [("get_weather", '{"city": "Paris"}'), ("add", '{"a": 1, "b": 2}')]
    assert expected == ("Weather, then a sum.", "One moment.", calls if parallel else calls[:1])
    for pieces in splits(GPT_OSS_CALLS):
        assert streamed(parser, pieces) == expected
