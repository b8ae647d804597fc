"""OpenAI's Responses API through `lmserve serve`, with the official `openai` client: the same
generations as the chat endpoint, as output items, usage and events that validate against
OpenAI's published schemas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.serving.test_messages import ADD as ANTHROPIC_ADD
from tests.api.serving.test_messages import chat_stream
from tests.api.test_openai_schema import validate  # noqa: F401 - the fixture

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
ADD = {  # the Messages tests' tool, as a Responses function tool
    "type": "function",
    "name": ANTHROPIC_ADD["name"],
    "description": ANTHROPIC_ADD["description"],
    "parameters": ANTHROPIC_ADD["input_schema"],
}


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server(
        "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _raw(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/responses", json={"model": MODEL, **body}, timeout=120)


def test_text_response_matches_the_chat_endpoint(client, server, validate) -> None:  # noqa: F811
    reply = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0
    )
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=40, temperature=0
    )
    assert reply.status == "completed" and reply.id.startswith("resp_")
    assert reply.output_text == chat.choices[0].message.content and "Paris" in reply.output_text
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    raw = _raw(server, {"input": QUESTION, "max_output_tokens": 40, "temperature": 0}).json()
    validate("Response", raw)
    assert raw["output"][0]["content"][0]["text"] == reply.output_text


def test_instructions_message_items_and_incomplete(client) -> None:
    items = [
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    reply = client.responses.create(
        model=MODEL, input=items, instructions="Be brief.", max_output_tokens=30, temperature=0
    )
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=30, temperature=0,
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": QUESTION}],
    )  # fmt: skip
    assert reply.output_text == chat.choices[0].message.content
    assert reply.instructions == "Be brief."
    short = client.responses.create(model=MODEL, input=QUESTION, max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details.reason == "max_output_tokens"
    assert short.usage.output_tokens == 3


def test_stream_events_validate_and_build_the_same_response(client, server, validate) -> None:  # noqa: F811
    whole = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0
    )
    with client.responses.stream(
        model=MODEL, input=QUESTION, max_output_tokens=40, temperature=0
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.status == "completed"
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    body = {"model": MODEL, "input": QUESTION, "max_output_tokens": 40, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=120) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    for event in events:
        validate("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_function_call_and_its_output(client, server, validate, stream: bool) -> None:  # noqa: F811
    kwargs: dict[str, Any] = dict(
        model=MODEL, input="What is 2 plus 3?", tools=[ADD], max_output_tokens=100,
        tool_choice={"type": "function", "name": "add"}, temperature=0,
    )  # fmt: skip
    if stream:
        with client.responses.stream(**kwargs) as events:
            reply = events.get_final_response()
    else:
        reply = client.responses.create(**kwargs)
    calls = [item for item in reply.output if item.type == "function_call"]
    assert calls and calls[0].name == "add" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), ADD["parameters"])
    raw = _raw(server, {k: v for k, v in kwargs.items() if k != "model"}).json()
    validate("Response", raw)
    follow_up = [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "add",
         "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"},
    ]  # fmt: skip
    second = client.responses.create(
        model=MODEL, input=follow_up, tools=[ADD], max_output_tokens=20, temperature=0
    )
    assert second.usage.input_tokens > reply.usage.input_tokens and second.output


def test_json_schema_text_format(client) -> None:
    schema = ADD["parameters"]
    reply = client.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=60, temperature=0,
        text={"format": {"type": "json_schema", "name": "sum", "schema": schema}},
    )  # fmt: skip
    jsonschema.validate(json.loads(reply.output_text), schema)


def test_errors(client, server) -> None:
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="Hi", previous_response_id="resp_1")
    image = {"type": "input_image", "image_url": "http://example.com/a.png"}
    with pytest.raises(openai.BadRequestError, match="takes no images"):
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [image]}])
    with pytest.raises(openai.BadRequestError, match="web_search"):
        client.responses.create(model=MODEL, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.NotFoundError, match="not stored"):
        client.responses.retrieve("resp_123")
    assert client.responses.create(model=MODEL, input="Hi", max_output_tokens=2).output


def test_reasoning_text_and_call_deltas_become_items(validate) -> None:  # noqa: F811
    """A chat stream with reasoning, content and a call (as the parsers produce it): one
    reasoning, one message and one function_call item, every event valid and numbered."""
    import asyncio

    from lmserve.api.responses_protocol import ResponsesRequest
    from lmserve.api.serving.responses import _events, _Head
    from lmserve.api.sse import encode

    usage = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    chunk_head = {"id": "chatcmpl-1", "created": 0, "model": "m"}
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
        {**chunk_head, "usage": usage, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
        for d in deltas
    ]
    chunks.append({**chunk_head, "usage": usage,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})  # fmt: skip
    head = _Head(ResponsesRequest(input="x", tools=[ADD]), "resp_1", 0)

    async def collect() -> list[str]:
        return [encode(event) async for event in _events(head, chat_stream(*chunks))]

    events = [json.loads(t.split("\n")[1].removeprefix("data: ")) for t in asyncio.run(collect())]
    for event in events:
        validate("ResponseStreamEvent", event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed"
    output = final["response"]["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call"]
    assert output[0]["content"][0]["text"] == "thinking"
    assert output[1]["content"][0]["text"] == "Sure."
    assert output[2]["arguments"] == '{"a": 1, "b": 2}' and output[2]["call_id"] == "call_1"
    assert final["response"]["usage"]["output_tokens"] == 5
