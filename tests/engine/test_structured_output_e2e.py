"""Constrained decoding through `LLM` on the real SmolLM2: outputs obey their constraint whether
batched, sampled, preempted, or behind a reasoning model's thinking."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from lmserve import LLM, SamplingParams
from lmserve.sampling_params import StructuredOutputsParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
IPV4 = r"(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}"


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_json_regex_and_choice_in_one_batch(smollm2_llm: LLM) -> None:
    """Both backends side by side: auto sends PERSON (string length bounds) to llguidance."""
    constraints = [
        StructuredOutputsParams(json=PERSON),
        StructuredOutputsParams(regex=IPV4),
        StructuredOutputsParams(choice=["Paris", "London", "Rome"]),
        StructuredOutputsParams(json=PERSON, backend="xgrammar"),
    ]
    prompts = [
        "Describe a person as JSON.",
        "Give an IP address.",
        "Capital of Italy?",
        "Describe a person as JSON.",
    ]
    outputs = smollm2_llm.chat(
        [chat(p) for p in prompts],
        [
            SamplingParams(temperature=0.7, seed=3, n=3, max_tokens=120, structured_outputs=c)
            for c in constraints
        ],
    )
    for out in outputs[0].outputs + outputs[3].outputs:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), PERSON)
    assert all(re.fullmatch(IPV4, o.text) for o in outputs[1].outputs)
    assert all(o.text in ("Paris", "London", "Rome") for o in outputs[2].outputs)
    assert smollm2_llm.engine_core.structured_output._states == {}  # no grammar state leaked


def test_invalid_constraint_is_a_value_error(smollm2_llm: LLM) -> None:
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(ValueError, match="regex"):
        smollm2_llm.generate(["x"], bad)
    assert not smollm2_llm.engine_core.has_unfinished_requests()


def test_preempted_constrained_requests_replay_to_the_same_output(smollm2_dir) -> None:
    """Greedy constrained outputs are the same whether or not the KV cache ran out mid-way."""
    params = SamplingParams(
        temperature=0, max_tokens=110, structured_outputs=StructuredOutputsParams(json=PERSON)
    )
    prompts = [chat(f"Describe person number {i} as JSON.") for i in range(6)]
    roomy = LLM(max_model_len=256, kv_cache_memory_gb=0.1)
    expected = [o.outputs[0].text for o in roomy.chat(prompts, params)]
    tight = LLM(max_model_len=256, num_kv_blocks=20, max_num_seqs=6)
    got = [o.outputs[0].text for o in tight.chat(prompts, params)]
    assert tight.engine_core.scheduler.num_preemptions > 0
    assert got == expected
    for text in got:
        jsonschema.validate(json.loads(text), PERSON)


def test_grammar_applies_only_after_the_reasoning_ends(smollm2_dir) -> None:
    """With a reasoning parser, an open <think> leaves the text free; a prompt that already closed
    the thinking (Qwen3's enable_thinking=False) is constrained from its first token."""
    llm = LLM(max_model_len=512, kv_cache_memory_gb=0.1, reasoning_parser="qwen3")
    params = SamplingParams(
        temperature=0,
        max_tokens=12,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
    )
    thinking, closed = llm.generate(
        [
            "Question: is the sky blue? Think first.\n<think>\n",
            "Question: is the sky blue?\n<think>\n\n</think>\n\nAnswer: ",
        ],
        params,
    )
    assert closed.outputs[0].text in ("yes", "no")
    assert thinking.outputs[0].text not in ("yes", "no")
    assert len(thinking.outputs[0].token_ids) > 2


def test_gpt_oss_grammar_applies_once_the_final_channel_opens(smollm2_dir) -> None:
    """`reasoning_parser="openai"`: the harmony prompt's open `<|start|>assistant` leaves the
    text free (the model thinks in its analysis channel first); a prompt that already opened
    the final channel is constrained from its first token."""
    llm = LLM(max_model_len=512, kv_cache_memory_gb=0.1, reasoning_parser="openai")
    params = SamplingParams(
        temperature=0,
        max_tokens=12,
        structured_outputs=StructuredOutputsParams(choice=["yes", "no"]),
    )
    prompt = "<|start|>user<|message|>Question: is the sky blue?<|end|><|start|>assistant"
    thinking, final = llm.generate([prompt, prompt + "<|channel|>final<|message|>"], params)
    assert final.outputs[0].text in ("yes", "no")
    assert thinking.outputs[0].text not in ("yes", "no")
    assert len(thinking.outputs[0].token_ids) > 2
