"""Fuzzing a real server: schemathesis over our own /openapi.json (bodies that fit it and bodies
that do not) and hypothesis-built bodies whose known fields hold any JSON at all. Every answer is
a 2xx or a 4xx in the route's error shape, within a bound, on a connection that stays usable; no
stream ends empty; afterwards the engine is idle again and still answers."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.api.conftest import Server, start_server, stop_server

MODEL = "tiny"
ANSWER_WITHIN_S = 30.0  # one request, of any size the server accepts, on the tiny model
MAX_EXAMPLES = 30  # per route and mode: bounded so the suite stays minutes, not hours


@pytest.fixture(scope="module")
def server(tiny_chat_dir) -> Iterator[Server]:
    server = start_server(
        str(tiny_chat_dir), "--served-model-name", MODEL, "--max-model-len", "256",
        "--max-num-seqs", "32", "--kv-cache-memory-gb", "0.05", "--max-request-body-mb", "1",
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def connection(server: Server) -> Iterator[httpx.Client]:
    """One keep-alive connection for every case: no answer may leave it unusable."""
    with httpx.Client(base_url=server.url, timeout=ANSWER_WITHIN_S) as client:
        yield client


@pytest.fixture(scope="module")
def openapi(server: Server) -> schemathesis.schemas.BaseSchema:
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_routes_answer_every_generated_body(
    mode: GenerationMode, openapi: schemathesis.schemas.BaseSchema, connection: httpx.Client
) -> None:
    """Every route of /openapi.json, with bodies, queries and paths that fit the schema
    (positive) or break it (negative)."""
    base_url = str(connection.base_url)
    for result in openapi.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # no body to break (any string is a valid path parameter)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def run(case: Any) -> None:
            kwargs = case.as_transport_kwargs(base_url=base_url)
            request = connection.build_request(
                kwargs["method"],
                kwargs["url"],
                params=kwargs.get("params"),
                headers=kwargs.get("headers"),
                content=_content(kwargs),
            )
            check_answer(connection, request)

        run()


def _content(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"]).encode()
    data = kwargs.get("data")
    return data.encode() if isinstance(data, str) else data


def check_answer(connection: httpx.Client, request: httpx.Request) -> None:
    """Send it: the answer must come within the bound, be no 5xx, keep its route's error shape
    and, streamed, hold events to its end; then the same connection must serve again."""
    started = time.monotonic()
    answer = connection.send(request)
    elapsed = time.monotonic() - started
    path = request.url.path
    assert answer.status_code < 500, (
        f"{answer.status_code} for {request.content[:300]!r}: {answer.text[:500]}"
    )
    assert elapsed < ANSWER_WITHIN_S
    kind = answer.headers.get("content-type", "")
    if answer.status_code >= 400:
        _check_error(path, answer)
    elif kind.startswith("text/event-stream"):
        _check_stream(path, answer.text)
    ok = connection.get("/health")
    assert ok.status_code == 200


def _check_error(path: str, answer: httpx.Response) -> None:
    body = answer.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and isinstance(body["error"]["message"], str), body
    else:
        error = body["error"]
        assert isinstance(error["message"], str) and error["message"], body
        assert {"type", "param", "code"} <= set(error), body


def _check_stream(path: str, text: str) -> None:
    events = [line for line in text.splitlines() if line.startswith("data: ")]
    assert events, f"an empty stream on {path}"
    last = events[-1]
    if path.startswith("/v1/messages"):
        assert "message_stop" in last or '"error"' in last, last
    elif path == "/v1/responses":
        assert re.search(r'"type": ?"(response\.(completed|incomplete|failed)|error)"', last), last
    else:
        assert last == "data: [DONE]", last


# ---- hypothesis: any JSON in the fields each route knows -------------------------------------
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["user", "assistant", "system", "tool", "text", "function", MODEL])
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_CONTENT = st.one_of(
    st.text(max_size=30),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": _JSON}), max_size=3),
    _JSON,
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | _JSON},
    optional={"content": _CONTENT, "tool_calls": _JSON, "name": _JSON, "tool_call_id": _JSON},
)
_SAMPLING = {
    "max_tokens": st.integers(-2, 300) | _JSON,
    "temperature": st.floats(-1, 3) | _JSON,
    "top_p": st.floats(-1, 2) | _JSON,
    "top_k": st.integers(-2, 100) | _JSON,
    "n": st.integers(-1, 4) | _JSON,
    "seed": _JSON,
    "stop": _JSON,
    "stream": st.booleans() | _JSON,
    "logprobs": _JSON,
    "logit_bias": _JSON,
    "response_format": _JSON,
    "stream_options": _JSON,
}
_BODIES = {
    "/v1/chat/completions": st.fixed_dictionaries(
        {"model": st.just(MODEL), "messages": st.lists(_MESSAGE, max_size=3) | _JSON},
        optional={
            **_SAMPLING,
            "tools": _JSON,
            "tool_choice": _JSON,
            "top_logprobs": _JSON,
            "chat_template_kwargs": _JSON,
            "max_completion_tokens": _JSON,
        },
    ),  # fmt: skip
    "/v1/completions": st.fixed_dictionaries(
        {"model": st.just(MODEL), "prompt": st.text(max_size=30) | _JSON},
        optional={**_SAMPLING, "echo": _JSON, "suffix": _JSON, "best_of": _JSON},
    ),
    "/v1/responses": st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "input": st.text(max_size=30) | st.lists(_MESSAGE, max_size=2) | _JSON,
        },
        optional={
            "max_output_tokens": st.integers(-1, 64) | _JSON,
            "instructions": _JSON,
            "stream": st.booleans() | _JSON,
            "text": _JSON,
            "tools": _JSON,
            "reasoning": _JSON,
            "temperature": _JSON,
            "previous_response_id": _JSON,
        },
    ),  # fmt: skip
    "/v1/messages": st.fixed_dictionaries(
        {
            "model": st.just(MODEL),
            "max_tokens": st.integers(-1, 64) | _JSON,
            "messages": st.lists(_MESSAGE, max_size=3) | _JSON,
        },
        optional={
            "system": _JSON,
            "stream": st.booleans() | _JSON,
            "tools": _JSON,
            "tool_choice": _JSON,
            "stop_sequences": _JSON,
            "thinking": _JSON,
            "temperature": _JSON,
        },
    ),  # fmt: skip
    "/tokenize": st.fixed_dictionaries(
        {"model": st.just(MODEL)},
        optional={
            "prompt": _JSON,
            "messages": st.lists(_MESSAGE, max_size=2) | _JSON,
            "add_special_tokens": _JSON,
        },
    ),  # fmt: skip
}


@pytest.mark.parametrize("path", sorted(_BODIES))
def test_known_fields_holding_any_json_get_an_answer(path: str, connection: httpx.Client) -> None:
    @given(body=_BODIES[path])
    @settings(max_examples=MAX_EXAMPLES * 3, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def run(body: dict[str, Any]) -> None:
        request = connection.build_request("POST", path, json=body)
        check_answer(connection, request)

    run()


def test_the_engine_is_idle_and_serves_after_the_fuzz(server: Server) -> None:
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{server.url}/metrics").text
        gauges = {
            name: float(value)
            for name, value in re.findall(
                r"^lmserve:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)\{.*\} (\S+)$",
                metrics,
                re.M,
            )
        }
        if gauges and not any(gauges.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert gauges == dict.fromkeys(
        ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"], 0.0
    )
    assert httpx.get(f"{server.url}/load").json()["server_load"] == 0
    reply = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=30,
    )
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
