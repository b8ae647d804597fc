"""Seeded random outputs, built from each format's markup pieces or by damaging a well-formed
output: whatever the text, streaming must agree with `extract()` and never raise."""

from __future__ import annotations

import random

import pytest

from lmserve.api.tool_parsers import get_tool_parser

NUM_TEXTS = 40
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"properties": {"s": {"type": "string"}, "n": {"type": "integer"}}},
        },
    }
]
PIECES = {
    "hermes": ["<tool_call>", "</tool_call>", "<tool", "\n", "{", "}", '"name": "f"', ", ",
               '"arguments": ', '{"a": [1, "x\\"}"]}', '"', "\\", ":", "1.5", "tru", "e", "hi"],
    "llama3_json": ["<|python_tag|>", "<|python", "{", "}", '"name": "f"', ", ",
                    '"parameters": ', '{"a": [1, "x;"]}', "; ", ";", " ", "\n", '"', "hi"],
    "mistral": ["[TOOL_CALLS]", "[TOOL_", "[", "]", "{", "}", '"name": "f"', ", ",
                '"arguments": ', '{"a": 1}', "[ARGS]", "[CALL_ID]", "f", "ab1", " ", "hi"],
    "openai": ["<|start|>assistant", "<|channel|>", "commentary", "analysis", "final",
               " to=functions.f", " to=python", "<|constrain|>json", "<|message|>", "<|call|>",
               "<|end|>", "<|return|>", '{"a": [1, "}"]}', "{", "}", '"', " ", "hi", "<|"],
    "pythonic": ["[", "]", "f(", "g (", ")", "a=", "b =", "1", '"x,)"', "[1, 2]", ",", " ",
                 "<|python_start|>", "<|python_end|>", "<|python", "{", "}", "'", "None", "x"],
    "qwen3_xml": ["<tool_call>", "</tool_call>", "<function=f>", "<function=", "g>",
                  "</function>", "<parameter=s>", "<parameter=n>", "</parameter>", "\n", "null",
                  "5", "hi", "<", ">", " ", "<tool", '{"a": 1}', "</para", "x\ny"],
}  # fmt: skip
WELL_FORMED = {
    "hermes": 'Hi\n<tool_call>\n{"name": "f", "arguments": {"a": [1, {"b": "x\\"}"}], '
    '"c": -1.5e3}}\n</tool_call>\n<tool_call>\n{"arguments": {}, "name": "g"}\n</tool_call>',
    "llama3_json": '<|python_tag|>{"name": "f", "parameters": {"a": [1, {"b": "x;"}]}}; '
    '{"name": "g", "arguments": {}}',
    "mistral": 'Hi[TOOL_CALLS][{"name": "f", "arguments": {"a": [1]}}, {"name": "g", '
    '"arguments": {}}][TOOL_CALLS]h[CALL_ID]a1[ARGS]{"z": true}',
    "openai": "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>"
    "commentary<|message|>Hi<|end|><|start|>assistant<|channel|>commentary to=functions.f "
    '<|constrain|>json<|message|>{"a": [1, {"b": "x"}]}<|call|><|start|>assistant to=functions.g'
    "<|channel|>commentary json<|message|>{}<|call|>",
    "pythonic": '<|python_start|>[f(a=[1, 2], b="x,)", c={"k": None}), g()]<|python_end|>',
    "qwen3_xml": "Hi\n<tool_call>\n<function=f>\n<parameter=s>\nnull!\n</parameter>\n"
    "<parameter=n>\n5\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=g>\n"
    "</function>\n</tool_call>",
}
DAMAGE = list('{}[]",:;() \n<>/=\\x') + ["<tool_call>", "[TOOL_CALLS]", "</parameter>"]
DAMAGE += ["<|message|>", "<|start|>", "<|call|>"]


def _damaged(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 3)):
        at = rng.randint(0, len(text))
        choice = rng.random()
        if choice < 0.3:
            text = text[:at]
        elif choice < 0.6:
            text = text[:at] + text[at + rng.randint(1, 4) :]
        else:
            text = text[:at] + rng.choice(DAMAGE) + text[at:]
    return text


@pytest.mark.parametrize("name", sorted(PIECES))
def test_random_markup(name: str, check_streaming) -> None:
    rng = random.Random(name)
    parser = get_tool_parser(name)(TOOLS)
    for _ in range(NUM_TEXTS):
        text = "".join(rng.choice(PIECES[name]) for _ in range(rng.randint(1, 12)))
        check_streaming(parser, text, well_formed=False)


@pytest.mark.parametrize("name", sorted(WELL_FORMED))
def test_damaged_outputs(name: str, check_streaming) -> None:
    rng = random.Random(name)
    parser = get_tool_parser(name)(TOOLS)
    check_streaming(parser, WELL_FORMED[name])
    for _ in range(NUM_TEXTS // 4):
        check_streaming(parser, _damaged(WELL_FORMED[name], rng), well_formed=False)
