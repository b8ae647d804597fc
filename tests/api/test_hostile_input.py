"""No input takes the server down: hostile bodies get a 4xx in the route's error shape, on a
connection that stays usable; work that could hold the event loop runs off it; a prompt list
runs as one batch; the errors answered are counted."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

USER = [{"role": "user", "content": "Hi"}]
S = "\\ud800"  # a lone surrogate, as a JSON escape


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server(
        "--max-model-len", "2048", "--kv-cache-memory-gb", "0.25", "--max-num-seqs", "8",
        "--trust-request-chat-template", "--max-request-body-mb", "4",
        "--served-model-name", "smol",
    )  # fmt: skip
    yield server
    stop_server(server)


def _raw(body: dict[str, Any], inject: str) -> bytes:
    """The body as JSON with `"@"` replaced by raw JSON text (what json.dumps cannot write)."""
    return json.dumps(body).replace('"@"', inject).encode()


CHAT, COMPLETIONS, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
CASES = [
    # (name, path, body, status, param the error names, words in its message)
    ("surrogate-content", CHAT, _raw({"messages": [{"role": "user", "content": "@"}]}, f'"{S}"'),
     400, "messages.0.content", "surrogate"),
    ("surrogate-prompt", COMPLETIONS, _raw({"prompt": "@"}, f'"{S}"'), 400, "prompt", "surrogate"),
    ("surrogate-stop-stream", COMPLETIONS,
     _raw({"prompt": "x", "stream": True, "stop": ["@"]}, f'"{S}"'), 400, "stop.0", "surrogate"),
    ("surrogate-tool-name", CHAT, _raw({"messages": USER, "tools": [{"type": "function",
     "function": {"name": "@"}}]}, f'"{S}"'), 400, "tools.0.function.name", "surrogate"),
    ("surrogate-responses", "/v1/responses", _raw({"input": "@"}, f'"{S}"'), 400, "input",
     "surrogate"),
    ("surrogate-messages", MESSAGES, _raw({"max_tokens": 2, "messages": [{"role": "user",
     "content": "@"}]}, f'"{S}"'), 400, None, "surrogate"),
    ("surrogate-tokenize", "/tokenize", _raw({"prompt": "@"}, f'"{S}"'), 400, "prompt",
     "surrogate"),
    ("65-bit-seed", COMPLETIONS, _raw({"prompt": "x", "seed": "@"}, str(2**64)), 400, "seed",
     "64 bits"),
    ("65-bit-schema-stream", CHAT, _raw({"messages": USER, "stream": True, "response_format": {
     "type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer",
     "maximum": "@"}}}}, str(2**65)), 400, "response_format.json_schema.schema.maximum",
     "64 bits"),
    ("huge-n", COMPLETIONS, _raw({"prompt": "x", "n": "@"}, str(2**62)), 400, "n", "128"),
    ("many-stops", COMPLETIONS, json.dumps({"prompt": "x", "stop": ["a"] * 65}).encode(), 400,
     "stop", "64"),
    ("text-part-number", CHAT, json.dumps({"messages": [{"role": "user", "content": [
     {"type": "text", "text": 5}]}]}).encode(), 400, "messages", "`text`, a string"),
    ("tool-calls-string", CHAT, json.dumps({"messages": [*USER, {"role": "assistant",
     "tool_calls": "abc"}]}).encode(), 400, "messages", "tool_calls is a list"),
    ("template-divides-by-zero", CHAT, json.dumps({"messages": USER,
     "chat_template": "{{ 1 / 0 }}"}).encode(), 400, "messages", "division by zero"),
    ("template-loops", CHAT, json.dumps({"messages": USER, "chat_template":
     "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}).encode(),
     400, "messages", "did not finish within 0.5 s"),
    ("template-builds-gigabytes", CHAT, json.dumps({"messages": USER,
     "chat_template": "{{ 'x' * 10000000000 }}"}).encode(), 400, "messages", "may build at most"),
    ("reserved-template-kwarg", CHAT, json.dumps({"messages": USER,
     "chat_template_kwargs": {"messages": []}}).encode(), 400, "chat_template_kwargs",
     "may not set messages"),
    ("deep-nesting", CHAT, b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400, None,
     "nested more than 64"),
    ("deep-nesting-messages", MESSAGES, b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}",
     400, None, "nested more than 64"),
    ("not-utf8", CHAT, b'{"messages": "\xff\xfe"}', 400, None, "not valid UTF-8"),
    ("not-json-messages", MESSAGES, b'{"messages": [', 400, None, "not valid JSON"),
    ("over-body-limit", COMPLETIONS, json.dumps({"prompt": "x" * (5 * 2**20)}).encode(), 413,
     None, "--max-request-body-mb"),
]  # fmt: skip


@pytest.fixture(scope="module")
def connection(server: Server) -> Iterator[httpx.Client]:
    """One keep-alive connection for every case: each error must leave it usable."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    ("path", "raw", "status", "param", "says"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hostile_bodies_get_a_4xx_and_the_connection_serves_on(
    connection: httpx.Client, path: str, raw: bytes, status: int, param: str | None, says: str
) -> None:
    model = b'{"model": "smol", ' if raw.startswith(b"{") else b""
    sent = model + raw[1:] if model else raw
    started = time.monotonic()
    answer = connection.post(path, content=sent, headers={"content-type": "application/json"})
    assert time.monotonic() - started < 1.5
    assert answer.status_code == status, answer.text
    if path == MESSAGES:
        assert answer.json()["type"] == "error" and says in answer.json()["error"]["message"]
    else:
        error = answer.json()["error"]
        assert says in error["message"] and error["param"] == param, error
    if status == 413:
        return  # the server may close a connection whose body it did not read
    ok = connection.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1})
    assert ok.status_code == 200  # the same connection, right after the error


def test_errors_answered_are_counted_by_status_and_route(server: Server) -> None:
    def count() -> float:
        text = httpx.get(f"{server.url}/metrics").text
        found = re.search(
            r'lmserve:http_errors_total\{route="/v1/completions",status="400"\} (\S+)', text
        )
        return float(found.group(1)) if found else 0.0

    before = count()
    httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "n": 0})
    assert count() == before + 1


def test_health_answers_while_a_long_prompt_is_tokenized_or_refused(server: Server) -> None:
    """A 3 MB text is tokenized (seconds of work) off the event loop, and a 10 MB prompt is
    refused unread by its length: /health answers meanwhile."""
    long_text = "hello world, this is text. " * 110_000  # ~3 MB
    results: dict[str, httpx.Response] = {}

    def tokenize() -> None:
        results["tokenize"] = httpx.post(
            f"{server.url}/tokenize", json={"prompt": long_text}, timeout=120
        )

    worker = threading.Thread(target=tokenize)
    worker.start()
    time.sleep(0.3)
    slowest = 0.0
    while worker.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.1)
    worker.join()
    assert results["tokenize"].json()["count"] > 500_000
    assert slowest < 1.0, slowest
    started = time.monotonic()
    huge = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": long_text, "max_tokens": 1},
        timeout=60,
    )
    assert huge.status_code == 400 and "at least" in huge.json()["error"]["message"]
    assert time.monotonic() - started < 1.0  # refused before it was tokenized


def test_a_prompt_list_runs_as_one_batch(server: Server) -> None:
    """Every prompt of a list request is in the engine at once (the scheduler batches them),
    not one after another."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    done: dict[str, Any] = {}

    def run() -> None:
        done["reply"] = client.completions.create(
            model="smol", prompt=["Once", "Twice", "Thrice", "Four"], max_tokens=64,
            extra_body={"ignore_eos": True},
        )  # fmt: skip

    worker = threading.Thread(target=run)
    worker.start()
    most = 0
    while worker.is_alive():
        most = max(most, httpx.get(f"{server.url}/load").json()["server_load"])
        time.sleep(0.02)
    worker.join()
    assert most == 4
    assert [c.index for c in done["reply"].choices] == [0, 1, 2, 3]
