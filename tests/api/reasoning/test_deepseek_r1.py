from __future__ import annotations

import pytest

from lmserve.api.reasoning import ReasoningResult
from lmserve.api.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser

# DeepSeek-R1's template ends the prompt with "<think>\n", so outputs usually lack "<think>".
CASES = [
    pytest.param(
        "The user asks 2+2.\nThat is 4.\n</think>\n\nThe answer is **4**.",
        ReasoningResult("The user asks 2+2.\nThat is 4.\n", "\n\nThe answer is **4**."),
        id="thinking-then-answer",
    ),
    pytest.param(
        "<think>\nPlan first.\n</think>\n\nDone.",
        ReasoningResult("\nPlan first.\n", "\n\nDone."),
        id="start-tag-in-output-dropped",
    ),
    pytest.param(
        "Hmm, let me count the <b> tags until max_tok",
        ReasoningResult("Hmm, let me count the <b> tags until max_tok", None),
        id="never-closed",
    ),
    pytest.param(
        "<think>\nstill going",
        ReasoningResult("\nstill going", None),
        id="never-closed-with-start-tag",
    ),
    pytest.param("</think>\n\nHi!", ReasoningResult(None, "\n\nHi!"), id="empty-thinking"),
    pytest.param("<think></think>Hi!", ReasoningResult(None, "Hi!"), id="empty-think-block"),
    pytest.param("Short.</think>", ReasoningResult("Short.", None), id="nothing-after-end"),
    pytest.param("r</think>\n\n", ReasoningResult("r", "\n\n"), id="whitespace-content-kept"),
    pytest.param("", ReasoningResult(None, None), id="empty-output"),
    pytest.param("</think>", ReasoningResult(None, None), id="only-end-tag"),
    pytest.param("<think>", ReasoningResult(None, None), id="only-start-tag"),
    pytest.param("<thi", ReasoningResult("<thi", None), id="cut-off-start-tag"),
    pytest.param("so 1 </thi", ReasoningResult("so 1 </thi", None), id="cut-off-end-tag"),
    pytest.param(
        "a < b, </th, </thinking>, <think> and <</think>x < y </thi",
        ReasoningResult("a < b, </th, </thinking>, <think> and <", "x < y </thi"),
        id="tag-lookalikes",
    ),
    pytest.param(
        "</thi</think>done", ReasoningResult("</thi", "done"), id="partial-tag-before-tag"
    ),
    pytest.param(
        " <think>x</think>y", ReasoningResult(" <think>x", "y"), id="start-tag-not-at-start"
    ),
    pytest.param(
        "<thinking>x</think>y", ReasoningResult("<thinking>x", "y"), id="start-tag-lookalike"
    ),
    pytest.param(
        "r</think>c1</think>c2", ReasoningResult("r", "c1</think>c2"), id="second-end-tag"
    ),
    pytest.param(
        "思考：２＋２＝４ 🤔\n</think>\n\n答案是 4 ✅",
        ReasoningResult("思考：２＋２＝４ 🤔\n", "\n\n答案是 4 ✅"),
        id="unicode",
    ),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract(text: str, expected: ReasoningResult) -> None:
    assert DeepSeekR1ReasoningParser().extract(text) == expected


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_streaming_matches_extract(text: str, expected: ReasoningResult, check_streaming) -> None:
    check_streaming(DeepSeekR1ReasoningParser(), text)


@pytest.mark.parametrize(
    ("prompt", "ended"),
    [
        ("<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n", False),
        ("<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜>", False),
        ("<｜User｜>hi<｜Assistant｜><think>\n\n</think>\n\n", True),
    ],
)
def test_reasoning_ended(prompt: str, ended: bool) -> None:
    assert DeepSeekR1ReasoningParser.reasoning_ended(prompt) is ended
    assert DeepSeekR1ReasoningParser().reasoning_ended(prompt) is ended
