"""Drop-in for vLLM (issue 17): a deployment's VLLM_API_KEY, and the fields, shapes and errors
that vLLM users' code reads, through a real server and the official clients."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

MODEL = "tiny"
KEY = "vllm-deployment-key"
USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server(tiny_chat_dir) -> Iterator[Server]:
    """Started as a vLLM deployment would be: the key only in VLLM_API_KEY, metrics for its
    dashboards."""
    os.environ["VLLM_API_KEY"] = KEY
    try:
        server = start_server(
            str(tiny_chat_dir), "--served-model-name", MODEL, "--max-model-len", "256",
            "--kv-cache-memory-gb", "0.05", "--metrics-prefix", "vllm",
            "--enable-tokenizer-info-endpoint", "--enable-server-load-tracking",
            "--enable-chunked-prefill", "--structured-outputs-config.backend", "xgrammar",
            "--enable-per-request-metrics", "--max-logprobs", "-1", "--enable-prompt-embeds",
        )  # fmt: skip
    finally:
        del os.environ["VLLM_API_KEY"]
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def _post(server: Server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


ROUTES = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": USER, "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2}),
    ("POST", "/v1/messages", {"model": MODEL, "messages": USER, "max_tokens": 2}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[r[1] for r in ROUTES])
def test_vllm_api_key_guards_every_v1_route(server: Server, method, path, body) -> None:
    def call(headers: dict[str, str]) -> httpx.Response:
        return httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=60)

    assert call({}).status_code == 401
    assert call({"Authorization": "Bearer wrong"}).status_code == 401
    assert call({"x-api-key": "wrong"}).status_code == 401
    assert call({"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert call({"x-api-key": KEY}).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_the_official_clients_pass_the_key(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages
    assert messages.create(model=MODEL, max_tokens=2, messages=USER).stop_reason
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


def test_any_of_several_api_keys_is_accepted(tiny_chat_dir) -> None:
    server = start_server(str(tiny_chat_dir), "--api-key", "first", "second",
                          "--kv-cache-memory-gb", "0.02", "--max-model-len", "128")  # fmt: skip
    try:
        for key, status in (("first", 200), ("second", 200), ("third", 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert httpx.get(f"{server.url}/v1/models", headers=headers).status_code == status
    finally:
        stop_server(server)


def test_a_chat_message_always_has_a_reasoning_key(server: Server) -> None:
    """vLLM's examples read message.reasoning; without a reasoning parser it is null."""
    body = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 2}).json()
    message = body["choices"][0]["message"]
    assert "reasoning" in message and message["reasoning"] is None


def test_completion_choices_carry_prompt_fields_as_null(server: Server) -> None:
    choice = _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2}).json()["choices"][
        0
    ]
    assert choice["prompt_logprobs"] is None and choice["prompt_token_ids"] is None
    asked = _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2,
                                               "return_token_ids": True}).json()  # fmt: skip
    assert len(asked["choices"][0]["prompt_token_ids"]) == asked["usage"]["prompt_tokens"]


CASES = [
    # (name, path, body, param the 400 names, words in its message)
    ("stream-options-without-stream", "/v1/completions",
     {"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options", "stream is true"),
    ("regex-not-a-string", "/v1/chat/completions",
     {"messages": USER, "structured_outputs": {"regex": 5}}, "structured_outputs.regex", "string"),
    ("seed-below-64-bits", "/v1/completions", {"prompt": "Hi", "seed": -(2**63) - 1}, "seed",
     "64 bits"),
    ("logit-bias-keys", "/v1/completions", {"prompt": "Hi", "logit_bias": {"abc": 1, "7": 2}},
     "logit_bias", "'abc'"),
    ("out-of-vocab", "/v1/completions", {"prompt": "Hi", "logit_bias": {"99999999": 1}}, None,
     "Vocabulary size: 49152"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param", "says"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_invalid_fields_are_400s_naming_them(server: Server, path, body, param, says) -> None:
    answer = _post(server, path, {"model": MODEL, "max_tokens": 2, **body})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param


def test_tokenize_takes_tools_beside_messages(server: Server) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    answer = httpx.post(
        f"{server.url}/tokenize",
        json={"model": MODEL, "messages": USER, "tools": [tool], "return_token_strs": True},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 0


def test_unknown_routes_answer_in_openais_error_shape(server: Server) -> None:
    assert httpx.get(f"{server.url}/v2/nothing-here").status_code == 401  # guarded, as vLLM's
    answer = httpx.get(f"{server.url}/nothing-here")
    assert answer.status_code == 404
    assert answer.json()["error"]["type"] == "NotFoundError"
    wrong_method = httpx.delete(f"{server.url}/health")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


# The series vLLM's Grafana dashboards and docs query (the seeds' "Monitoring Dashboards",
# "Metrics"), as Prometheus exposes them.
VLLM_SERIES = (
    "num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
    "prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total",
    "prompt_tokens_total", "prompt_tokens_cached_total", "generation_tokens_total",
    "request_success_total", "time_to_first_token_seconds_bucket",
    "inter_token_latency_seconds_bucket", "time_per_output_token_seconds_bucket",
    "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket",
    "request_prefill_time_seconds_bucket", "request_decode_time_seconds_bucket",
    "request_inference_time_seconds_bucket", "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket", "iteration_tokens_total_bucket",
    "request_params_n_bucket", "request_params_max_tokens_bucket", "cache_config_info",
    "engine_sleep_state",
)  # fmt: skip
# What the queries of vLLM's published Grafana dashboards select (examples/online_serving/
# prometheus_grafana/grafana.json, and dashboards/grafana/*.json, which write the colon as an
# underscore, as some metric pipelines rename it).
DASHBOARD_SERIES = (
    "e2e_request_latency_seconds_bucket", "e2e_request_latency_seconds_sum",
    "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total",
    "time_per_output_token_seconds_bucket", "time_per_output_token_seconds_sum",
    "time_per_output_token_seconds_count", "num_requests_running", "num_requests_waiting",
    "time_to_first_token_seconds_bucket", "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count", "gpu_cache_usage_perc", "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket", "request_success_total", "request_queue_time_seconds_sum",
    "request_prefill_time_seconds_sum", "request_decode_time_seconds_sum",
    "request_max_num_generation_tokens_sum",
)  # fmt: skip


def test_metrics_prefix_vllm_gives_vllms_series_under_the_served_name(server: Server) -> None:
    for _ in range(2):  # two tokens or more each, so decode and per-token times exist
        _post(server, "/v1/completions", {"prompt": "Hi there", "max_tokens": 4,
                                          "ignore_eos": True})  # fmt: skip
    text = httpx.get(f"{server.url}/metrics").text
    series = {line.split("{")[0] for line in text.splitlines() if line.startswith("vllm:")}
    missing = [name for name in VLLM_SERIES + DASHBOARD_SERIES if f"vllm:{name}" not in series]
    assert not missing, missing
    # each dashboard query selects its series by the served name; vLLM's engine label too
    assert 'vllm:request_max_num_generation_tokens_sum{engine="0",model_name="tiny"}' in text
    assert (
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"}' in text
    )
    assert 'vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="awake"} 1.0' in text
    assert 'enable_prefix_caching="True"' in text and 'block_size="16"' in text
    assert not [line for line in text.splitlines() if line.startswith("lmserve:num_requests")]


def _events(server: Server, path: str, body: dict) -> list[dict]:
    with httpx.stream(
        "POST", f"{server.url}{path}", json={"model": MODEL, "stream": True, **body},
        headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
    ) as answer:  # fmt: skip
        data = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
    return [json.loads(line) for line in data if line != "[DONE]"]


def test_continuous_usage_only_comes_with_include_usage(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    alone = _events(server, "/v1/completions",
                    {**body, "stream_options": {"continuous_usage_stats": True}})  # fmt: skip
    assert alone and all("usage" not in e or e["usage"] is None for e in alone)
    both = {"include_usage": True, "continuous_usage_stats": True}
    for path, extra in (("/v1/completions", body),
                        ("/v1/chat/completions", {"messages": USER, "max_tokens": 3})):  # fmt: skip
        events = _events(server, path, {**extra, "stream_options": both})
        assert all(e["usage"]["prompt_tokens"] > 0 for e in events), path  # the role chunk too


def test_a_streamed_chat_returns_token_ids_as_the_whole_answer_does(server: Server) -> None:
    body = {"messages": USER, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
    whole = _post(server, "/v1/chat/completions", body).json()
    events = _events(server, "/v1/chat/completions",
                     {**body, "stream_options": {"include_usage": True}})  # fmt: skip
    assert events[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert len(whole["prompt_token_ids"]) == events[-1]["usage"]["prompt_tokens"]
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids") or []]
    assert streamed == whole["choices"][0]["token_ids"]


def test_a_streamed_messages_delta_carries_the_whole_usage(server: Server) -> None:
    events = _events(server, "/v1/messages", {"messages": USER, "max_tokens": 3})
    delta = next(e for e in events if e["type"] == "message_delta")
    usage = delta["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == 3
    assert {"cache_creation_input_tokens", "cache_read_input_tokens"} <= set(usage)
    client = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    with client.messages.stream(model=MODEL, max_tokens=3, messages=USER) as stream:
        final = stream.get_final_message()
    assert final.usage.input_tokens == usage["input_tokens"] and final.usage.output_tokens == 3


def test_tokenizer_info_describes_the_tokenizer(server: Server, tiny_chat_dir) -> None:
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["tokenizer_class"] and info["eos_token"] == "<|im_end|>"
    assert info["chat_template"] == (tiny_chat_dir / "chat_template.jinja").read_text()


def test_truncation_keeps_the_side_asked_for(server: Server) -> None:
    prompt = list(range(100, 120))

    def kept(**fields: object) -> list[int]:
        body = {"prompt": prompt, "max_tokens": 1, "return_token_ids": True, **fields}
        answer = _post(server, "/v1/completions", body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["prompt_token_ids"]

    assert kept(truncate_prompt_tokens=5) == prompt[-5:]
    assert kept(truncate_prompt_tokens=5, truncation_side="right") == prompt[:5]
    assert kept(truncate_prompt_tokens=-1) == prompt  # -1: as many as the context holds
    zero = _post(server, "/v1/completions", {"prompt": prompt, "truncate_prompt_tokens": 0})
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "truncate_prompt_tokens"


def test_per_request_fields_vllm_clients_send(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 1, "return_tokens_as_token_ids": True,
            "kv_transfer_params": {"do_remote_prefill": False}}  # fmt: skip
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    assert all(t.startswith("token_id:") for t in choice["logprobs"]["tokens"])
    chat = {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 1,
            "return_tokens_as_token_ids": True}  # fmt: skip
    content = _post(server, "/v1/chat/completions", chat).json()["choices"][0]["logprobs"]
    assert all(entry["token"].startswith("token_id:") for entry in content["content"])


def test_a_unix_domain_socket_serves(tiny_chat_dir, tmp_path) -> None:
    socket_path = tmp_path / "lmserve.sock"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmserve.cli", "serve", str(tiny_chat_dir), "--uds",
         str(socket_path), "--kv-cache-memory-gb", "0.02", "--max-model-len", "128"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        client = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=30)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if client.get("http://lmserve/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        answer = client.post(
            "http://lmserve/v1/completions", json={"prompt": "Hi", "max_tokens": 2}
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _check_timeline(metrics: dict, num_tokens: int) -> None:
    assert set(metrics) == {"time_to_first_token_ms", "generation_time_ms", "queue_time_ms",
                            "mean_itl_ms", "tokens_per_second"}  # fmt: skip
    assert metrics["time_to_first_token_ms"] > 0 and metrics["queue_time_ms"] >= 0
    assert metrics["generation_time_ms"] > 0
    assert metrics["mean_itl_ms"] == pytest.approx(
        metrics["generation_time_ms"] / (num_tokens - 1), abs=1e-2
    )
    inference_s = (metrics["time_to_first_token_ms"] + metrics["generation_time_ms"]) / 1000
    assert metrics["tokens_per_second"] == pytest.approx(num_tokens / inference_s, rel=1e-2)


def test_per_request_metrics_time_each_single_generation(server: Server, client) -> None:
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, extra_body={"ignore_eos": True}
    )
    _check_timeline(chat.model_extra["metrics"], 4)
    completion = _post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 3,
                                                   "ignore_eos": True}).json()  # fmt: skip
    _check_timeline(completion["metrics"], 3)
    stream = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=3, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    assert all("metrics" not in (c.model_extra or {}) for c in chunks[:-1])
    _check_timeline(chunks[-1].model_extra["metrics"], 3)
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=3)
    assert response.model_extra["metrics"]["time_to_first_token_ms"] > 0
    # n > 1 or several prompts: no one timeline to report, so null, as vLLM's
    several = _post(server, "/v1/completions", {"prompt": ["Hi", "Ho"], "max_tokens": 2}).json()
    assert several["metrics"] is None
    two = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, n=2)
    assert two.model_extra["metrics"] is None


def test_a_load_report_header_answers_its_request_header(server: Server) -> None:
    body = {"prompt": "Hi", "max_tokens": 1}
    plain = _post(server, "/v1/completions", body)
    assert "endpoint-load-metrics" not in plain.headers
    headers = {"Authorization": f"Bearer {KEY}", "endpoint-load-metrics-format": "TEXT"}
    text = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
    report = text.headers["endpoint-load-metrics"]
    assert report.startswith("TEXT ") and "named_metrics.kv_cache_usage_perc=" in report
    assert "named_metrics.num_requests_waiting=" in report
    headers["endpoint-load-metrics-format"] = "JSON"
    as_json = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
    kind, _, payload = as_json.headers["endpoint-load-metrics"].partition(" ")
    named = json.loads(payload)["named_metrics"]
    assert kind == "JSON" and set(named) == {"kv_cache_usage_perc", "num_requests_waiting"}
    assert 0.0 <= named["kv_cache_usage_perc"] <= 1.0


CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"], "additionalProperties": False}  # fmt: skip
OTHER_SHAPE = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}  # fmt: skip


def test_a_named_tool_choice_wins_over_a_response_format(server: Server, client) -> None:
    """instructor sends both; as vLLM, the named call's schema shapes the output."""
    tool = {"type": "function", "function": {"name": "city", "parameters": CITY}}
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=40, tools=[tool], response_format=OTHER_SHAPE,
        tool_choice={"type": "function", "function": {"name": "city"}},
    )  # fmt: skip
    call = chat.choices[0].message.tool_calls[0]
    assert call.function.name == "city"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    response = client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=40,
        tools=[{"type": "function", "name": "city", "parameters": CITY, "strict": True}],
        tool_choice={"type": "function", "name": "city"},
        text={"format": {"type": "json_schema", "name": "answer",
                         "schema": OTHER_SHAPE["json_schema"]["schema"]}},
    )  # fmt: skip
    item = next(item for item in response.output if item.type == "function_call")
    assert json.loads(item.arguments)["city"] in ("Paris", "Rome")


def test_mcp_tools_are_refused_saying_so(client) -> None:
    mcp = {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.example"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=MODEL, input="Hi", tools=[mcp])
    error = refused.value.body
    assert "MCP tools are not supported yet" in error["message"]
    assert error["param"] == "tools[0]"


def test_the_tool_server_flag_is_refused_at_start(tiny_chat_dir) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "lmserve.cli", "serve", str(tiny_chat_dir),
         "--tool-server", "localhost:8001"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode != 0
    assert "--tool-server" in started.stderr and "not supported yet" in started.stderr


def test_echo_with_logprobs_covers_the_prompt_with_offsets(server: Server) -> None:
    body = {"prompt": "Hello there", "max_tokens": 3, "echo": True, "logprobs": 1,
            "temperature": 0, "return_token_ids": True}  # fmt: skip
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    num_prompt = len(choice["prompt_token_ids"])
    assert len(logprobs["tokens"]) == num_prompt + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(lp, float) for lp in logprobs["token_logprobs"][1:])
    offsets, text = logprobs["text_offset"], choice["text"]
    assert offsets[0] == 0 and "".join(logprobs["tokens"]) == text
    for token, offset in zip(logprobs["tokens"], offsets, strict=True):
        assert text[offset : offset + len(token)] == token
    # the echoed prompt's logprobs are the prompt_logprobs the engine computes
    asked = _post(server, "/v1/completions", {**body, "echo": False, "prompt_logprobs": 0})
    prompt_entries = asked.json()["choices"][0]["prompt_logprobs"]
    prompt_ids = choice["prompt_token_ids"]
    for i in range(1, num_prompt):
        expected = prompt_entries[i][str(prompt_ids[i])]["logprob"]
        assert logprobs["token_logprobs"][i] == pytest.approx(expected, abs=1e-5)
    # a stream sends the same, the echo and the prompt's logprobs with the first token
    events = _events(server, "/v1/completions", body)
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
    assert [t for lp in streamed for t in lp["tokens"]] == logprobs["tokens"]
    assert [o for lp in streamed for o in lp["text_offset"]] == offsets


def test_a_character_cut_by_max_tokens_stays_in_the_text(server: Server, tiny_chat_dir) -> None:
    """The token_ids and the text agree: the cut character's bytes come back as U+FFFD."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    partial = next(i for i in range(256, 5000) if tokenizer.decode([i]) == "\ufffd")
    body = {"prompt": "Hi", "max_tokens": 1, "logit_bias": {str(partial): 100},
            "return_token_ids": True}  # fmt: skip
    choice = _post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["token_ids"] == [partial] and choice["text"] == "\ufffd"
    chat = {"messages": USER, "max_tokens": 1, "logit_bias": {str(partial): 100}}
    message = _post(server, "/v1/chat/completions", chat).json()["choices"][0]["message"]
    assert message["content"] == "\ufffd"


def test_whole_vocabulary_and_named_token_logprobs(server: Server) -> None:
    """top_logprobs -1 is every token (with --max-logprobs -1); logprob_token_ids returns the
    named tokens' logprobs beside the sampled one's, the same numbers."""
    base = {"messages": USER, "max_tokens": 2, "temperature": 0, "logprobs": True,
            "return_tokens_as_token_ids": True}  # fmt: skip
    everything = _post(server, "/v1/chat/completions", {**base, "top_logprobs": -1}).json()
    steps = everything["choices"][0]["logprobs"]["content"]
    vocab = 49152
    assert all(len(step["top_logprobs"]) == vocab for step in steps)
    full = [{int(t["token"][9:]): t["logprob"] for t in step["top_logprobs"]} for step in steps]
    assert sum(math.exp(lp) for lp in full[0].values()) == pytest.approx(1.0, abs=1e-3)
    named = [7, 300, 4000]
    asked = _post(server, "/v1/chat/completions", {**base, "logprob_token_ids": named}).json()
    for step, reference in zip(asked["choices"][0]["logprobs"]["content"], full, strict=True):
        got = [int(t["token"][9:]) for t in step["top_logprobs"]]
        assert got == [int(step["token"][9:]), *named]  # the sampled token first
        for t in step["top_logprobs"]:
            assert t["logprob"] == pytest.approx(reference[int(t["token"][9:])], abs=1e-5)
    completion = {"prompt": "Hi", "max_tokens": 1, "logprobs": 0, "logprob_token_ids": named,
                  "return_tokens_as_token_ids": True}  # fmt: skip
    top = _post(server, "/v1/completions", completion).json()["choices"][0]["logprobs"]
    assert {f"token_id:{t}" for t in named} <= set(top["top_logprobs"][0])
    without = _post(server, "/v1/completions", {**completion, "logprobs": None})
    assert without.status_code == 400 and "logprob_token_ids" in without.json()["error"]["message"]


def test_tokens_in_tokens_out_generates_what_completions_does(server: Server) -> None:
    """POST /inference/v1/generate: the ids the model sampled, as /v1/completions samples them
    for the same ids; whole and streamed alike; logprobs name tokens by id."""
    prompt = [504, 3681, 314, 1345]
    params = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1}
    body = {"model": MODEL, "token_ids": prompt, "sampling_params": params}
    whole = _post(server, "/inference/v1/generate", body)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    (choice,) = answer["choices"]
    reference = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 6,
                      "temperature": 0, "ignore_eos": True, "return_token_ids": True}).json()  # fmt: skip
    assert choice["token_ids"] == reference["choices"][0]["token_ids"]
    assert choice["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(len(c["top_logprobs"]) >= 1 for c in content)
    events = _events(server, "/inference/v1/generate",
                     {**body, "stream_options": {"include_usage": True}})  # fmt: skip
    streamed = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    assert streamed == choice["token_ids"]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]][-1] == "length"
    two = _post(server, "/inference/v1/generate", {**body, "sampling_params": {
        "n": 2, "max_tokens": 3, "seed": 1, "temperature": 1.0}}).json()  # fmt: skip
    assert sorted(c["index"] for c in two["choices"]) == [0, 1]


@pytest.mark.parametrize(
    ("body", "param"),
    [({"token_ids": [], "sampling_params": {}}, "token_ids"),
     ({"token_ids": [1], "sampling_params": {"temperature": -1}}, "sampling_params.temperature"),
     ({"token_ids": [1], "sampling_params": {"best_of": 2}}, "sampling_params.best_of"),
     ({"token_ids": [10**9], "sampling_params": {}}, None)],
    ids=["empty", "negative-temperature", "unknown-field", "out-of-vocabulary"],
)  # fmt: skip
def test_tokens_in_tokens_out_refuses_bad_bodies(server: Server, body, param) -> None:
    answer = _post(server, "/inference/v1/generate", body)
    assert answer.status_code == 400, answer.text
    if param is not None:
        assert answer.json()["error"]["param"] == param
    assert _post(server, "/inference/v1/generate", {"token_ids": [1]}, key=None).status_code == 401


def test_beam_search_through_the_server_is_llm_beam_search(server: Server, client,
                                                          tiny_chat_dir) -> None:  # fmt: skip
    """use_beam_search with n beams answers the n sequences LLM.beam_search finds (which equal
    HF's, tests/engine/test_beam_search.py), best first; streamed alike."""
    from lmserve import LLM, BeamSearchParams

    prompt = [504, 3681, 314, 1345, 28, 253]
    body = {"prompt": prompt, "max_tokens": 5, "n": 3, "use_beam_search": True,
            "length_penalty": 0.5, "return_token_ids": True}  # fmt: skip
    answer = _post(server, "/v1/completions", body)
    assert answer.status_code == 200, answer.text
    got = [c["token_ids"] for c in answer.json()["choices"]]
    llm = LLM(str(tiny_chat_dir), max_model_len=256, kv_cache_memory_gb=0.05)
    params = BeamSearchParams(beam_width=3, max_tokens=5, length_penalty=0.5)
    (expected,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    assert got == [seq.tokens[len(prompt) :] for seq in expected.sequences]
    assert [c["text"] for c in answer.json()["choices"]] == [s.text for s in expected.sequences]
    events = _events(server, "/v1/completions", body)
    streamed = {c["index"]: c["token_ids"] for e in events for c in e["choices"]}
    assert [streamed[i] for i in range(3)] == got
    chat = client.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=4, n=2, extra_body={"use_beam_search": True}
    )
    rendered = httpx.post(f"{server.url}/tokenize", json={"messages": USER}).json()["tokens"]
    (chat_beams,) = llm.beam_search(
        {"prompt_token_ids": rendered}, BeamSearchParams(beam_width=2, max_tokens=4)
    )
    assert [c.message.content for c in chat.choices] == [s.text for s in chat_beams.sequences]
    refused = _post(server, "/v1/completions", {**body, "logprobs": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"


def _encoded(tensor) -> str:
    import base64
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def test_prompt_embeds_answer_as_their_tokens_do(server: Server, client, tiny_chat_dir) -> None:
    """vLLM's client example: prompt=None, the embeddings in extra_body. The embeddings of a
    token prompt generate what the tokens do; a soft prompt (no token's embedding) runs too."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(tiny_chat_dir / "model.safetensors")
    table = weights["model.embed_tokens.weight"]
    ids = [504, 3681, 314, 1345]
    greedy = {"max_tokens": 6, "temperature": 0.0}
    by_ids = client.completions.create(model=MODEL, prompt=ids, **greedy)
    by_embeds = client.completions.create(
        model=MODEL, prompt=None, **greedy, extra_body={"prompt_embeds": _encoded(table[ids])}
    )
    assert by_embeds.choices[0].text == by_ids.choices[0].text
    assert by_embeds.usage.prompt_tokens == 4
    soft = table[ids] + 0.01 * torch.randn(
        4, table.shape[1], generator=torch.Generator().manual_seed(0)
    )
    both = _post(server, "/v1/completions", {"prompt": ids, "prompt_embeds": [_encoded(soft)],
                                             "max_tokens": 3, "return_token_ids": True})  # fmt: skip
    choices = both.json()["choices"]
    assert len(choices) == 2 and choices[0]["prompt_token_ids"] is None  # embeddings first
    assert choices[1]["prompt_token_ids"] == ids


@pytest.mark.parametrize(
    ("extra", "param", "says"),
    [({"prompt_embeds": "%%%"}, "prompt_embeds", "base64"),
     ({"prompt_embeds": "AAAA"}, None, "torch.save"),
     ({"prompt_embeds": "EMBEDS", "echo": True}, "echo", "embeddings"),
     ({"prompt_embeds": "WRONG_WIDTH"}, None, "shape [num_tokens, 64]"),
     ({}, "prompt", "required"),
     ({"prompt_embeds": "EMBEDS", "use_beam_search": True}, "use_beam_search", "not prompt_embeds")],
    ids=["not-base64", "not-a-tensor", "echo", "wrong-width", "neither", "beam-search"],
)  # fmt: skip
def test_bad_prompt_embeds_are_400s(server: Server, extra, param, says) -> None:
    import torch

    samples = {"EMBEDS": _encoded(torch.zeros(2, 64)), "WRONG_WIDTH": _encoded(torch.zeros(2, 9))}
    if extra.get("prompt_embeds") in samples:
        extra = {**extra, "prompt_embeds": samples[extra["prompt_embeds"]]}
    answer = _post(server, "/v1/completions", {"max_tokens": 2, **extra})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert says in error["message"]
    if param is not None:
        assert error["param"] == param
