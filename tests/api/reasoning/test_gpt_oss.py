"""`--reasoning-parser openai`: gpt-oss's harmony channels split into reasoning and content;
function calls stay in the content, canonical, for the `openai` tool parser."""

from __future__ import annotations

import pytest

from lmserve.api.reasoning import ReasoningResult
from lmserve.api.reasoning.gpt_oss import GptOssReasoningParser

CALL = '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Paris"}<|call|>'
CASES = [
    pytest.param(
        "<|channel|>analysis<|message|>The user asks for a capital.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Paris.<|return|>",
        ReasoningResult("The user asks for a capital.", "Paris."),
        id="think-then-answer",
    ),
    pytest.param(
        "<|channel|>analysis<|message|>Short.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Paris.",
        ReasoningResult("Short.", "Paris."),
        id="stop-token-not-in-text",
    ),
    pytest.param(
        "<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>"
        'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'
        "<|call|>",
        ReasoningResult("Need weather.", CALL),
        id="call-kept-for-the-tool-parser",
    ),
    pytest.param(
        "<|channel|>commentary<|message|>Checking now.<|end|><|start|>assistant to=functions."
        'get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>',
        ReasoningResult(None, "Checking now." + CALL),
        id="preamble-and-recipient-before-the-channel",
    ),
    pytest.param(
        "<|channel|>analysis<|message|>Look it up.<|end|><|start|>assistant<|channel|>analysis"
        ' to=browser.search<|message|>{"query": "x"}<|call|>',
        ReasoningResult('Look it up.{"query": "x"}', None),
        id="built-in-tool-is-reasoning",
    ),
    pytest.param(
        "<|channel|>analysis<|message|>Still thinking when max_tokens",
        ReasoningResult("Still thinking when max_tokens", None),
        id="cut-off-in-analysis",
    ),
    pytest.param(
        '<|channel|>commentary to=functions.get_weather<|message|>{"city": "Pa',
        ReasoningResult(None, '<|channel|>commentary to=functions.get_weather<|message|>'
                        '{"city": "Pa<|call|>'),
        id="cut-off-in-a-call",
    ),
    pytest.param("", ReasoningResult(None, None), id="empty"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract(text: str, expected: ReasoningResult, check_streaming) -> None:
    parser = GptOssReasoningParser()
    assert parser.extract(text) == expected
    check_streaming(parser, text)


def test_the_template_prompt_leaves_the_thinking_open() -> None:
    """The prompt ends in `<|start|>assistant`, after any earlier final answer."""
    history = "<|start|>assistant<|channel|>final<|message|>Hi.<|end|><|start|>user<|message|>"
    assert not GptOssReasoningParser.reasoning_ended(history + "Again<|end|><|start|>assistant")
    assert GptOssReasoningParser.needs_special_tokens
