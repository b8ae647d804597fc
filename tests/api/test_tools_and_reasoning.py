"""Tool calling and reasoning through `lmserve serve` on SmolLM2, with a chat template that
renders Qwen3-style thinking (`enable_thinking`) and the tools it is given."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0, "maximum": 999},
                    "b": {"type": "integer", "minimum": 0, "maximum": 999},
                },
                "required": ["a", "b"],
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_dir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    template = Path(tmp_path_factory.mktemp("template")) / "thinking.jinja"
    template.write_text(TEMPLATE)
    server = start_server(
        "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--reasoning-parser", "qwen3", "--chat-template", str(template),
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")


def check_calls(calls: list[dict[str, Any]]) -> None:
    assert calls
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        jsonschema.validate(
            json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]]
        )


def rebuild_stream(chunks: list[Any]) -> tuple[dict[int, dict[str, Any]], str | None, str, str]:
    """Tool calls, finish reason, content and reasoning as the client would assemble them, with
    OpenAI's rules checked: the id, type and name come once, in a call's first delta."""
    calls: dict[int, dict[str, Any]] = {}
    finish, content, reasoning = None, "", ""
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            finish = choice.finish_reason or finish
            for tc in delta.tool_calls or []:
                if tc.index not in calls:
                    assert tc.id and tc.type == "function" and tc.function.name
                    calls[tc.index] = {"id": tc.id, "type": "function",
                                       "function": {"name": tc.function.name, "arguments": ""}}  # fmt: skip
                else:
                    assert tc.id is None and tc.function.name is None
                calls[tc.index]["function"]["arguments"] += tc.function.arguments or ""
    return calls, finish, content, reasoning


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "add"}}]
)
def test_forced_tool_calls_are_valid(client: openai.OpenAI, tool_choice: Any, stream: bool) -> None:
    kwargs = dict(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, n=2, seed=1,
        temperature=0.8, max_tokens=150, extra_body=NO_THINKING,
    )  # fmt: skip
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        per_choice = {}
        for index in (0, 1):
            only = [c.model_copy(update={"choices": [x for x in c.choices if x.index == index]})
                    for c in chunks]  # fmt: skip
            calls, finish, content, _ = rebuild_stream(only)
            assert finish == "tool_calls" and content == ""
            per_choice[index] = [calls[i] for i in sorted(calls)]
        results = list(per_choice.values())
    else:
        reply = client.chat.completions.create(**kwargs)
        assert all(c.finish_reason == "tool_calls" for c in reply.choices)
        assert all(c.message.content is None for c in reply.choices)
        results = [[tc.model_dump() for tc in c.message.tool_calls] for c in reply.choices]
    for calls in results:
        check_calls(calls)
        if isinstance(tool_choice, dict):
            assert [c["function"]["name"] for c in calls] == ["add"]


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required",
        parallel_tool_calls=False, max_tokens=150, extra_body=NO_THINKING,
    )  # fmt: skip
    calls = [tc.model_dump() for tc in reply.choices[0].message.tool_calls]
    assert len(calls) == 1
    check_calls(calls)


def test_auto_tool_choice_answers_and_history_round_trips(client: openai.OpenAI) -> None:
    """With the parser flags set, auto is accepted; the tool result goes back in the history."""
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, max_tokens=40, temperature=0,
        extra_body=NO_THINKING,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    if choice.message.tool_calls:
        check_calls([tc.model_dump() for tc in choice.message.tool_calls])
    history = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]  # fmt: skip
    follow = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS, tool_choice="none", max_tokens=20,
        extra_body=NO_THINKING,
    )  # fmt: skip
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls


def test_thinking_is_reasoning_content_streamed_or_not(client: openai.OpenAI) -> None:
    """SmolLM2 never closes the <think> the template opened: all its text is reasoning."""
    kwargs = dict(model=MODEL, messages=WEATHER, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    message = whole.message.model_dump()
    assert message["content"] is None and message["reasoning_content"]
    assert message["reasoning"] == message["reasoning_content"]
    _, finish, content, reasoning = rebuild_stream(
        list(client.chat.completions.create(**kwargs, stream=True))
    )
    assert (reasoning, content, finish) == (message["reasoning_content"], "", whole.finish_reason)


def test_thinking_off_gives_content_and_the_grammar_applies(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=WEATHER, max_tokens=100, response_format={"type": "json_object"},
        extra_body=NO_THINKING,
    )  # fmt: skip
    message = reply.choices[0].message.model_dump()
    assert message["reasoning_content"] is None
    assert isinstance(json.loads(message["content"]), dict)


def test_a_required_array_cut_by_max_tokens_keeps_its_whole_calls(
    server: Server, client: openai.OpenAI
) -> None:
    """A small model forced to call tools may go on emitting calls until max_tokens cuts the
    array: the calls completed before the cut come back, with finish_reason "length"."""
    kwargs = dict(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0,
        extra_body={**NO_THINKING, "return_token_ids": True},
    )  # fmt: skip

    def calls(choice: Any) -> list[tuple[str, str]]:
        return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]

    full = client.chat.completions.create(**kwargs, max_tokens=300)
    longest = calls(full.choices[0])
    assert longest, full
    used = full.usage.completion_tokens
    for limit in (used - 1, used * 3 // 4):
        cut = client.chat.completions.create(**kwargs, max_tokens=limit).choices[0]
        assert cut.finish_reason == "length"
        kept = calls(cut)
        assert kept == longest[: len(kept)]  # whole calls only, the same as without the cut
        assert (cut.message.content is None) == bool(kept)
    # Cut the array's closing tokens (and the end token), not the last call: every call stays
    ids = full.choices[0].token_ids

    def text_of(token_id: int) -> str:
        answer = httpx.post(f"{server.url}/detokenize", json={"tokens": [token_id]})
        return answer.json()["prompt"].strip()

    closing = 0
    while text_of(ids[-1 - closing]) in ("]", "", "<|im_end|>"):
        closing += 1
    assert 0 < closing < used
    open_array = client.chat.completions.create(**kwargs, max_tokens=used - closing).choices[0]
    assert open_array.finish_reason == "length" and open_array.message.content is None
    assert calls(open_array) == longest
