"""Anthropic's Messages API through `lmserve serve`, with the official `anthropic` client: the
same generations as the chat endpoint, in Anthropic's blocks, stop reasons, events and errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import msgspec
import openai
import pydantic
import pytest

from lmserve.api.replies import Event
from lmserve.api.schemas.chat import ChatCompletionChunk
from lmserve.api.serving.messages import _events
from lmserve.api.sse import encode
from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_server import metric, metrics_once_idle

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "sk-test"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# Anthropic's current SDK has no sampling arguments; the server still takes them.
GREEDY = {"temperature": 0}
ADD = {
    "name": "add",
    "description": "Add two numbers",
    "input_schema": {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99},
            "b": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["a", "b"],
    },
}


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server(
        "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25", "--api-key", KEY,
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def test_text_reply_matches_the_chat_endpoint(client: anthropic.Anthropic, server: Server) -> None:
    reply = client.messages.create(model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    assert reply.type == "message" and reply.role == "assistant" and reply.model == MODEL
    assert reply.id.startswith("msg_")
    [block] = reply.content
    assert block.type == "text" and "Paris" in block.text
    assert reply.stop_reason == "end_turn" and reply.stop_sequence is None
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).chat.completions.create(
        model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY
    )
    assert block.text == chat.choices[0].message.content
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    counted = client.messages.count_tokens(model=MODEL, messages=FRANCE)
    assert counted.input_tokens == reply.usage.input_tokens


def test_bodies_validate_against_the_sdk_types(server: Server) -> None:
    """Strictly: the SDK itself builds its objects without validating them."""
    headers = {"x-api-key": KEY}
    body = {"model": MODEL, "max_tokens": 12, "messages": FRANCE}
    reply = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=60)
    anthropic.types.Message.model_validate(reply.json(), strict=True)
    events = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True},
                      headers=headers, timeout=60) as response:  # fmt: skip
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [events.validate_json(line.removeprefix("data: ")).type for line in lines]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    counted = httpx.post(f"{server.url}/v1/messages/count_tokens", headers=headers,
                         json={"model": MODEL, "messages": FRANCE}).json()  # fmt: skip
    anthropic.types.MessageTokensCount.model_validate(counted, strict=True)


def test_system_prompt_stop_sequence_and_max_tokens(client: anthropic.Anthropic, server) -> None:
    plain = client.messages.create(model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    text = plain.content[0].text
    french = "Answer in French, in one word."
    system = client.messages.create(
        model=MODEL, max_tokens=20, messages=FRANCE, extra_body=GREEDY,
        system=[{"type": "text", "text": french}],
    )  # fmt: skip
    chat = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).chat.completions.create(
        model=MODEL, max_tokens=20, temperature=0,
        messages=[{"role": "system", "content": french}, *FRANCE],
    )  # fmt: skip
    assert system.content[0].text == chat.choices[0].message.content != text
    assert system.usage.input_tokens == chat.usage.prompt_tokens
    stop_word = text.split()[2]
    stopped = client.messages.create(
        model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY, stop_sequences=[stop_word]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop_word
    assert stopped.content[0].text == text[: text.index(stop_word)]
    short = client.messages.create(model=MODEL, max_tokens=3, messages=FRANCE, extra_body=GREEDY)
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_a_final_assistant_turn_is_continued(client: anthropic.Anthropic) -> None:
    """Anthropic's prefill: the reply continues the last assistant turn instead of starting a
    new one, and count_tokens counts that same prompt."""
    whole = client.messages.create(model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    text = whole.content[0].text
    head = text[: text.index(" Paris")]
    prefilled = [*FRANCE, {"role": "assistant", "content": head}]
    reply = client.messages.create(model=MODEL, max_tokens=3, messages=prefilled, extra_body=GREEDY)
    assert reply.content[0].text.startswith(" Paris")
    counted = client.messages.count_tokens(model=MODEL, messages=prefilled)
    assert counted.input_tokens == reply.usage.input_tokens


def test_stream_events_build_the_same_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY)
    kinds = []
    with client.messages.stream(
        model=MODEL, max_tokens=40, messages=FRANCE, extra_body=GREEDY
    ) as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    raw = [k for k in kinds if k not in ("text",)]  # the helper adds "text" events per delta
    assert raw[:2] == ["message_start", "content_block_start"]
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    "tool_choice", [{"type": "tool", "name": "add"}, {"type": "any"}], ids=["named", "any"]
)
def test_forced_tool_use_is_valid(client: anthropic.Anthropic, tool_choice, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL, max_tokens=100, extra_body=GREEDY, tools=[ADD], tool_choice=tool_choice,
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
    )  # fmt: skip
    if stream:
        with client.messages.stream(**kwargs) as events:
            reply = events.get_final_message()
    else:
        reply = client.messages.create(**kwargs)
    uses = [b for b in reply.content if b.type == "tool_use"]
    assert uses and reply.stop_reason == "tool_use"
    for use in uses:
        assert use.name == "add" and use.id.startswith("call_")
        jsonschema.validate(use.input, ADD["input_schema"])


def test_output_config_json_schema(client: anthropic.Anthropic) -> None:
    """output_config.format constrains the reply to the schema, as response_format does."""
    schema = ADD["input_schema"]
    reply = client.messages.create(
        model=MODEL, max_tokens=60, extra_body=GREEDY, messages=FRANCE,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.content[0].text), schema)


def test_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    """A tool_use / tool_result exchange renders into the prompt (it grows by both turns)."""
    first = client.messages.create(
        model=MODEL, max_tokens=100, extra_body=GREEDY, tools=[ADD],
        tool_choice={"type": "tool", "name": "add"},
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
    )  # fmt: skip
    use = next(b for b in first.content if b.type == "tool_use")
    follow_up = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": [use.model_dump(include={"type", "id", "name", "input"})]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": use.id, "content": "5"},
            {"type": "text", "text": "Say the result."},
        ]},
    ]  # fmt: skip
    second = client.messages.create(
        model=MODEL, max_tokens=30, extra_body=GREEDY, tools=[ADD], messages=follow_up
    )
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.content and second.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_a_client_leaving_mid_stream_frees_its_request(server: Server) -> None:
    count = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]
    body = {"model": MODEL, "max_tokens": 900, "messages": count, "stream": True, **GREEDY}
    headers = {"x-api-key": KEY}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers=headers) as r:
        deltas = (line for line in r.iter_lines() if line == "event: content_block_delta")
        for _ in range(10):
            next(deltas)
        assert httpx.get(f"{server.url}/load").json()["server_load"] == 1
    text = metrics_once_idle(server)
    assert metric(text, "lmserve:kv_cache_usage_perc", model_name=MODEL) == 0


def test_errors_are_anthropic_errors(client: anthropic.Anthropic, server: Server) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="nope", max_tokens=5, messages=FRANCE)
    assert missing.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}
    with pytest.raises(anthropic.BadRequestError, match="image"):
        client.messages.create(model=MODEL, max_tokens=5,
                               messages=[{"role": "user", "content": [image]}])  # fmt: skip
    with pytest.raises(anthropic.BadRequestError) as too_long:
        client.messages.create(model=MODEL, max_tokens=5000, messages=FRANCE)
    assert too_long.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=FRANCE
        )
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    for body, field in [({"model": MODEL, "messages": FRANCE}, "max_tokens"), ("{", "JSON")]:
        content = body if isinstance(body, str) else json.dumps(body)
        r = httpx.post(f"{server.url}/v1/messages", content=content, headers=headers)
        assert r.status_code == 400 and field in r.json()["error"]["message"]
        assert r.json()["type"] == "error"
    # the server keeps serving
    assert client.messages.create(model=MODEL, max_tokens=2, messages=FRANCE).content


async def chat_stream(*chunks: dict[str, Any]):
    """A chat endpoint's stream of these chunks (typed as the chat endpoint types them), for the
    converters built on it."""
    for chunk in chunks:
        yield Event(msgspec.convert(chunk, ChatCompletionChunk))


def test_reasoning_and_tool_call_deltas_become_blocks() -> None:
    """A chat stream with reasoning, content and a call, as a reasoning parser and a tool
    parser produce it: one thinking, one text and one tool_use block, in order."""
    usage = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    head = {"id": "chatcmpl-1", "created": 0, "model": "m", "usage": usage}
    deltas = [
        {"role": "assistant", "content": ""},
        {"reasoning_content": "think"},
        {"reasoning_content": "ing"},
        {"content": "Sure."},
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "function": {"name": "add", "arguments": ""}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ', "b": 2}'}}]},
    ]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas
    ]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})

    async def collect() -> list[Event]:
        return [event async for event in _events("msg_1", chat_stream(*chunks))]

    events = []
    for event in asyncio.run(collect()):
        events.append(json.loads(encode(event).split("\n")[1].removeprefix("data: ")))
        assert event.name == events[-1]["type"]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"]
    assert starts[2]["id"] == "call_1" and starts[2]["name"] == "add"
    deltas_by_block: dict[int, str] = {}
    for e in events:
        if e["type"] == "content_block_delta":
            d = e["delta"]
            deltas_by_block[e["index"]] = deltas_by_block.get(e["index"], "") + (
                d.get("thinking") or d.get("text") or d.get("partial_json")
            )
    assert deltas_by_block == {0: "thinking", 1: "Sure.", 2: '{"a": 1, "b": 2}'}
    assert events[0]["message"]["usage"]["input_tokens"] == 7
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-1]["type"] == "message_stop"
