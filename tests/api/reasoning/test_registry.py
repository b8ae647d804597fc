from __future__ import annotations

import pytest

from lmserve.api.reasoning import REASONING_PARSERS, ReasoningParser, get_reasoning_parser
from lmserve.api.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from lmserve.api.reasoning.gpt_oss import GptOssReasoningParser
from lmserve.api.reasoning.qwen3 import Qwen3ReasoningParser


def test_names_resolve_to_their_classes() -> None:
    assert REASONING_PARSERS == ("deepseek_r1", "openai", "qwen3")
    assert get_reasoning_parser("deepseek_r1") is DeepSeekR1ReasoningParser
    assert get_reasoning_parser("openai") is GptOssReasoningParser
    assert get_reasoning_parser("qwen3") is Qwen3ReasoningParser


@pytest.mark.parametrize("name", ["deepseek_r1", "qwen3"])
def test_think_tag_parsers_build_without_arguments(name: str) -> None:
    parser = get_reasoning_parser(name)()
    assert isinstance(parser, ReasoningParser)
    assert (parser.start_text, parser.end_text) == ("<think>", "</think>")
    assert parser.reasoning_ended_in_prompt is False


@pytest.mark.parametrize("name", ["", "deepseek-r1", "Qwen3", "granite"])
def test_unknown_name_lists_the_known_ones(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown reasoning parser .*deepseek_r1, openai, qwen3"):
        get_reasoning_parser(name)
