"""Overload answers instead of queues (--max-num-queued-reqs, --max-num-queued-tokens) and SSE
keep-alive pings (--sse-keep-alive-interval), on a real server with a tiny random model."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

MAX_NUM_SEQS, MAX_QUEUED, MAX_QUEUED_TOKENS = 2, 4, 100
LONG = {"prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model_dirs) -> Iterator[Server]:
    server = start_server(
        str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.05",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-num-queued-reqs", str(MAX_QUEUED),
        "--max-num-queued-tokens", str(MAX_QUEUED_TOKENS),
        "--sse-keep-alive-interval", "0.02", "--served-model-name", "tiny",
    )  # fmt: skip
    yield server
    stop_server(server)


async def _timed_post(port: int, path: str, body: dict[str, Any]) -> tuple[float, int, dict, Any]:
    """(seconds, status, headers, JSON body) of one POST on its own open connection, timed
    from the request's first byte. Plain asyncio streams: with 50 at once, httpx's own work
    on a 2-core machine would be most of what is measured."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data
    await asyncio.sleep(0.2)  # every connection open before the first request is sent
    start = time.monotonic()
    writer.write(request)
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
    payload = json.loads(await reader.readexactly(int(headers["content-length"])))
    elapsed = time.monotonic() - start
    writer.close()
    return elapsed, int(head[0].split()[1]), headers, payload


async def _until_gauge(http: httpx.AsyncClient, name: str, value: int) -> None:
    """Wait (up to 10 s) until the server's /metrics shows the gauge at this value: the engine
    has taken the requests, however slow the box, where a fixed sleep would race them."""
    pattern = re.compile(rf"^lmserve:{name}{{[^}}]*}} (\S+)$", re.MULTILINE)
    deadline = time.monotonic() + 10
    while True:
        found = pattern.search((await http.get("/metrics")).text)
        if found and float(found.group(1)) == value:
            return
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        await asyncio.sleep(0.01)


def test_a_burst_gets_200s_and_fast_503s_then_the_server_serves(server: Server) -> None:
    port = int(server.url.rsplit(":", 1)[1])

    async def burst() -> list[tuple[float, int, dict, Any]]:
        return await asyncio.gather(
            *(_timed_post(port, "/v1/completions", LONG) for _ in range(50))
        )

    answers = asyncio.run(burst())
    statuses = [status for _, status, _, _ in answers]
    assert set(statuses) == {200, 503}
    assert statuses.count(200) >= MAX_QUEUED  # in flight at once: running and waiting
    for elapsed, status, headers, body in answers:
        if status == 503:
            error = body["error"]
            assert error["type"] == "ServiceUnavailableError"
            assert "max-num-queued-reqs" in error["message"]
            assert headers["retry-after"] == "1"
            assert elapsed < 0.5, elapsed  # turned away at once, not queued behind seconds of work
        else:
            assert body["usage"]["completion_tokens"] == 500
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    after = client.completions.create(model="tiny", prompt=[1, 2], max_tokens=4)
    assert after.usage.completion_tokens == 4  # nothing left counted as in flight


def test_a_prefill_backlog_past_the_token_limit_turns_requests_away(server: Server) -> None:
    """Two long requests hold both slots; a waiting 120-token prompt puts the prefill backlog
    past 100 tokens, so the next request gets a 503 naming the flag, though only 3 of the 4
    allowed sequences are in flight. Once the backlog is prefilled, requests are served."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def scenario() -> tuple[httpx.Response, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            running = [
                asyncio.ensure_future(http.post("/v1/completions", json=LONG))
                for _ in range(MAX_NUM_SEQS)
            ]
            await _until_gauge(http, "num_requests_running", MAX_NUM_SEQS)
            big = {"prompt": list(range(1, 121)), "max_tokens": 2}
            waiting = asyncio.ensure_future(http.post("/v1/completions", json=big))
            # taken, waiting for a slot: 120 tokens of backlog
            await _until_gauge(http, "num_requests_waiting", 1)
            turned_away = await http.post("/v1/completions", json={**LONG, "max_tokens": 2})
            return turned_away, await asyncio.gather(*running, waiting)

    turned_away, served = asyncio.run(scenario())
    assert turned_away.status_code == 503, turned_away.text
    assert "max-num-queued-tokens" in turned_away.json()["error"]["message"]
    assert turned_away.headers["retry-after"] == "1"
    assert [r.status_code for r in served] == [200, 200, 200]
    after = client.completions.create(model="tiny", prompt=[1, 2], max_tokens=4)
    assert after.usage.completion_tokens == 4  # the backlog emptied: nothing left counted


def test_a_request_for_more_sequences_than_ever_run_is_a_400(server: Server) -> None:
    too_many = httpx.post(
        f"{server.url}/v1/completions",
        json={"prompt": [[1, 2], [3, 4], [5, 6]], "n": 2, "max_tokens": 1},
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
    ok = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": [1, 2], "n": 4, "max_tokens": 1}
    )
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4


def test_idle_streams_get_keep_alive_comments_the_client_skips(server: Server) -> None:
    """A stream queued behind two long requests waits with nothing to send: it gets SSE
    comments, which the openai client skips."""
    body = {**LONG, "max_tokens": 5, "stream": True}

    async def behind_two_running(stream: Callable[[], Awaitable[Any]]) -> Any:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            running = [client.post("/v1/completions", json=LONG) for _ in range(MAX_NUM_SEQS)]
            tasks = [asyncio.ensure_future(r) for r in running]
            await _until_gauge(client, "num_requests_running", MAX_NUM_SEQS)  # the next waits
            result = await stream()
            await asyncio.gather(*tasks)
            return result

    async def raw_lines() -> list[str]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=120) as client,
            client.stream("POST", "/v1/completions", json=body) as response,
        ):
            return [line async for line in response.aiter_lines()]

    lines = asyncio.run(behind_two_running(raw_lines))
    data = [line for line in lines if line.startswith("data: ")]
    assert ": keep-alive" in lines
    assert lines.index(": keep-alive") < lines.index(data[0])  # while it waited
    assert data[-1] == "data: [DONE]"

    async def client_chunks() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = await client.completions.create(
            model="tiny", prompt=[1, 2, 3], max_tokens=5, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return [chunk async for chunk in stream]

    chunks = asyncio.run(behind_two_running(client_chunks))
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_request_waiting_past_max_waiting_time_gets_a_503(tiny_model_dirs) -> None:
    """Behind a long request on one slot, a request with no token after 0.3 s is aborted
    with a 503 (whole, or as the stream's error event); the slot then serves normally."""
    server = start_server(
        str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.05", "--max-num-seqs", "1",
        "--max-waiting-time-s", "0.3", "--served-model-name", "tiny",
    )  # fmt: skip
    try:

        async def behind_a_long_one() -> tuple[httpx.Response, float, list[str]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
                four = {**LONG, "n": 4}  # one after another on the one slot: seconds of work
                long = asyncio.ensure_future(client.post("/v1/completions", json=four))
                await _until_gauge(client, "num_requests_running", 1)  # the slot is taken
                started = time.monotonic()
                waited = await client.post("/v1/completions", json={**LONG, "max_tokens": 2})
                elapsed = time.monotonic() - started
                streamed = {**LONG, "max_tokens": 2, "stream": True}
                async with client.stream("POST", "/v1/completions", json=streamed) as response:
                    lines = [line async for line in response.aiter_lines() if line]
                assert (await long).status_code == 200
                return waited, elapsed, lines

        waited, elapsed, lines = asyncio.run(behind_a_long_one())
        assert waited.status_code == 503 and waited.headers["retry-after"] == "1"
        assert "--max-waiting-time-s" in waited.json()["error"]["message"]
        assert 0.3 <= elapsed < 1.0
        error = json.loads(lines[0].removeprefix("data: "))["error"]
        assert error["type"] == "ServiceUnavailableError" and lines[-1] == "data: [DONE]"
        ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1], "max_tokens": 3})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(f"{server.url}/metrics").text
        assert re.search(r"lmserve:num_requests_waiting\{[^}]*\} 0\.0", metrics)  # none left
    finally:
        stop_server(server)


@pytest.mark.parametrize(
    ("body", "expected"),
    [({"prompt": [[1, 2], [3, 4]], "n": 3}, (6, "n")),
     ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, (2, "n")),
     ({"input": [{"role": "user", "content": "hi"}]}, (1, "n")),  # a Responses request
     ({"input": ["a", "b", "c"]}, (3, "input")),
     ({"input": [[1, 2], [3]]}, (2, "input")),
     ({"input": [1, 2, 3]}, (1, "n")),  # one tokenized input
     ({"query": "q", "documents": ["a", "b"]}, (2, "documents")),
     ({"text_1": "q", "text_2": ["a", "b", "c", "d"]}, (4, "text_2"))],
)  # fmt: skip
def test_pooling_requests_count_one_sequence_per_input(body, expected) -> None:
    from lmserve.api.admission import _num_seqs

    assert _num_seqs(body) == expected
