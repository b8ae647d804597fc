from __future__ import annotations

import subprocess
import sys

import pytest

from lmserve.api.tool_parsers import (
    TOOL_PARSERS,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    get_tool_parser,
)
from lmserve.api.tool_parsers.gpt_oss import GptOssToolParser
from lmserve.api.tool_parsers.hermes import HermesToolParser
from lmserve.api.tool_parsers.llama3_json import Llama3JsonToolParser
from lmserve.api.tool_parsers.mistral import MistralToolParser
from lmserve.api.tool_parsers.pythonic import PythonicToolParser
from lmserve.api.tool_parsers.qwen3_xml import Qwen3XmlToolParser


def test_names_resolve_to_their_classes() -> None:
    assert TOOL_PARSERS == ("hermes", "llama3_json", "mistral", "openai", "pythonic", "qwen3_xml")
    assert get_tool_parser("openai") is GptOssToolParser
    assert get_tool_parser("hermes") is HermesToolParser
    assert get_tool_parser("llama3_json") is Llama3JsonToolParser
    assert get_tool_parser("mistral") is MistralToolParser
    assert get_tool_parser("pythonic") is PythonicToolParser
    assert get_tool_parser("qwen3_xml") is Qwen3XmlToolParser


@pytest.mark.parametrize("name", ["", "Hermes", "llama3-json", "qwen3_coder"])
def test_unknown_name_lists_the_known_ones(name: str) -> None:
    with pytest.raises(
        ValueError,
        match=r"unknown tool call parser .*hermes, llama3_json, mistral, openai, pythonic, qwen3_xml",
    ):
        get_tool_parser(name)


@pytest.mark.parametrize("name", TOOL_PARSERS)
def test_plain_text_is_content(name: str, check_streaming) -> None:
    parser = get_tool_parser(name)([])
    assert isinstance(parser, ToolParser)
    text = "Paris is the capital of France.\n\nAnything else?"
    assert parser.extract(text) == ExtractedToolCalls([], text)
    check_streaming(parser, text)


@pytest.mark.parametrize("name", TOOL_PARSERS)
@pytest.mark.parametrize("text", ["", " \n\t "])
def test_blank_output_has_no_content(name: str, text: str) -> None:
    result = get_tool_parser(name)([]).extract(text)
    assert result == ExtractedToolCalls([], None)
    assert not result.tools_called


def test_tools_called() -> None:
    call = ToolCall("call_x", "f", "{}")
    assert ExtractedToolCalls([call], None).tools_called


def test_importing_the_parsers_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "from lmserve.api.tool_parsers import TOOL_PARSERS, get_tool_parser\n"
        "for name in TOOL_PARSERS:\n"
        "    get_tool_parser(name)\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
