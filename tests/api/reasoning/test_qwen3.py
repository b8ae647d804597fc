from __future__ import annotations

import pytest

from lmserve.api.reasoning import ReasoningResult
from lmserve.api.reasoning.qwen3 import Qwen3ReasoningParser

CASES = [
    pytest.param(
        "<think>\nOkay, the user said hello.\n</think>\n\nHello! How can I help?",
        ReasoningResult("\nOkay, the user said hello.\n", "\n\nHello! How can I help?"),
        id="qwen3-template-start-tag-in-output",
    ),
    pytest.param(
        "Okay, the user said hello.\n</think>\n\nHello!",
        ReasoningResult("Okay, the user said hello.\n", "\n\nHello!"),
        id="qwen3.5-template-start-tag-in-prompt",
    ),
    pytest.param(
        "<think>\nWait, maybe <tool_call> is",
        ReasoningResult("\nWait, maybe <tool_call> is", None),
        id="never-closed",
    ),
    pytest.param(
        "Just an answer, no tags.",
        ReasoningResult("Just an answer, no tags.", None),
        id="no-tags-is-unfinished-thinking",
    ),
    pytest.param(
        "<think>\n\n</think>\n\nHi.", ReasoningResult("\n\n", "\n\nHi."), id="blank-thinking"
    ),
    pytest.param("<think></think>", ReasoningResult(None, None), id="empty-think-block"),
    pytest.param("", ReasoningResult(None, None), id="empty-output"),
    pytest.param(
        "if a<b and c</d then </think>x</thin",
        ReasoningResult("if a<b and c</d then ", "x</thin"),
        id="tag-lookalikes",
    ),
    pytest.param(
        "<think>用户在问候。\n</think>\n\n你好！👋",
        ReasoningResult("用户在问候。\n", "\n\n你好！👋"),
        id="unicode",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract(text: str, expected: ReasoningResult) -> None:
    assert Qwen3ReasoningParser().extract(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_streaming_matches_extract(text: str, expected: ReasoningResult, check_streaming) -> None:
    check_streaming(Qwen3ReasoningParser(), text)


USER_TURN = "<|im_start|>user\nhi<|im_end|>\n"
PAST_TURN = "<|im_start|>assistant\n<think>\nold\n</think>\n\nold answer<|im_end|>\n" + USER_TURN


@pytest.mark.parametrize(
    ("prompt", "ended"),
    [
        pytest.param(USER_TURN + "<|im_start|>assistant\n", False, id="qwen3-thinking"),
        pytest.param(
            USER_TURN + "<|im_start|>assistant\n<think>\n\n</think>\n\n", True, id="thinking-off"
        ),
        pytest.param(USER_TURN + "<|im_start|>assistant\n<think>\n", False, id="qwen3.5-thinking"),
        pytest.param(PAST_TURN + "<|im_start|>assistant\n<think>\n", False, id="history-then-open"),
        pytest.param(
            PAST_TURN + "<|im_start|>assistant\n<think>\n\n</think>\n\n",
            True,
            id="history-then-off",
        ),
        # The rule sees only the last tag: a closed block in history counts as closed.
        pytest.param(PAST_TURN + "<|im_start|>assistant\n", True, id="history-then-no-tag"),
    ],
)
def test_reasoning_ended(prompt: str, ended: bool) -> None:
    assert Qwen3ReasoningParser.reasoning_ended(prompt) is ended


@pytest.mark.parametrize(
    ("text", "content"),
    [
        ("Hello!", "Hello!"),
        ("\n\nSure: a</think>b", "\n\nSure: a</think>b"),
        ("<think>kept</think>", "<think>kept</think>"),
        ("", None),
    ],
)
def test_thinking_off_output_is_all_content(text: str, content: str | None, check_streaming):
    parser = Qwen3ReasoningParser(reasoning_ended_in_prompt=True)
    assert parser.extract(text) == ReasoningResult(None, content)
    check_streaming(parser, text)
