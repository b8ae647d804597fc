"""`lmserve serve` end to end with the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(smollm2_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smollm2_server.url}/v1", api_key="unused")


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_answers_with_exact_usage(client: openai.OpenAI, smollm2_server: Server) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32
    )
    choice = reply.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    counted = httpx.post(f"{smollm2_server.url}/tokenize", json={"messages": QUESTION}).json()
    assert reply.usage.prompt_tokens == counted["count"]
    completion_ids = httpx.post(
        f"{smollm2_server.url}/tokenize",
        json={"prompt": choice.message.content, "add_special_tokens": False},
    ).json()["count"]
    # the generated text plus the end-of-turn token
    assert reply.usage.completion_tokens == completion_ids + 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=32
    )
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            temperature=0,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == "stop" and all(f is None for f in finishing[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_shapes_n_logprobs_and_seed(client: openai.OpenAI) -> None:
    batch = client.completions.create(
        model=MODEL, prompt=["The sky is", "One, two,"], max_tokens=5, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1] and all(c.text for c in batch.choices)
    ids = client.completions.create(
        model=MODEL, prompt=[504, 3681, 314], max_tokens=3, temperature=0
    )
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens == 3
    sampled = dict(
        model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=7, temperature=1.0
    )
    first, second = client.completions.create(**sampled), client.completions.create(**sampled)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len(first.choices) == 2
    with_lp = client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=3, logprobs=2, temperature=0, echo=True
    )
    lp = with_lp.choices[0].logprobs  # as vLLM: the echoed prompt's tokens too, the first null
    assert len(lp.tokens) == with_lp.usage.prompt_tokens + 3 and lp.top_logprobs[0] is None
    assert all(len(t) >= 2 for t in lp.top_logprobs[1:])
    assert with_lp.choices[0].text.startswith("Hello")
    stopped = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"]
    )
    assert " 7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert all(
        len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content
    )


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"messages": QUESTION, "no_such_field": 1}, 400, "no_such_field"),
        ({"messages": QUESTION, "temperature": -1}, 400, "temperature"),
        ({"messages": QUESTION, "model": "nope"}, 404, "does not exist"),
        (  # tools default to tool_choice "auto", which needs the parser flags
            {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "--enable-auto-tool-choice",
        ),
        (
            {
                "messages": QUESTION,
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            400,
            "'g', which is not among the tools",
        ),
        ({"messages": QUESTION, "tool_choice": "required"}, 400, "tool_choice needs tools"),
        ({"messages": QUESTION, "functions": [{"name": "f"}]}, 400, "functions"),
        (
            {"messages": QUESTION, "add_generation_prompt": True, "continue_final_message": True},
            400,
            "continue_final_message",
        ),
        (
            {"messages": [{"role": "user", "content": "word " * 3000}]},
            400,
            "maximum context length is 2048 tokens",
        ),
        ({"messages": QUESTION, "max_tokens": 5000}, 400, "maximum context length"),
        (
            {"messages": QUESTION, "chat_template": "{{ messages }}"},
            400,
            "start the server with --trust-request-chat-template",
        ),
    ],
)
def test_chat_errors(smollm2_server: Server, body: dict, status: int, needle: str) -> None:
    response = httpx.post(f"{smollm2_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and {"message", "type", "param", "code"} <= error.keys()


def test_errors_keep_the_connection_and_the_log_clean(smollm2_server: Server) -> None:
    """A 400 is an answer, not a crash: on one keep-alive connection bad requests and a good
    one all get their replies, and the server logs no traceback for them."""
    bad = {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    with httpx.Client(base_url=smollm2_server.url, timeout=60) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json=bad).status_code == 400
        assert client.post("/v1/completions", json={"prompt": "a", "n": 0}).status_code == 400
        good = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
        assert good.status_code == 200
    assert "Traceback" not in smollm2_server.log()


def test_assistant_tool_call_turn_without_content(client: openai.OpenAI) -> None:
    """OpenAI sends a tool-call turn with content null; a template that concatenates content
    (SmolLM2's) renders it as "", as vLLM does, instead of failing."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3)
    assert reply.choices[0].message.content


def test_invocations_route_by_body(client: openai.OpenAI, smollm2_server: Server) -> None:
    """SageMaker's /invocations answers as /v1/chat/completions or /v1/completions would."""
    url = f"{smollm2_server.url}/invocations"
    chat = {"messages": QUESTION, "max_tokens": 8, "temperature": 0}
    reply = httpx.post(url, json=chat, timeout=60).json()
    expected = client.chat.completions.create(model=MODEL, **chat)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == expected.choices[0].message.content
    prompt = {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}
    reply = httpx.post(url, json=prompt, timeout=60).json()
    assert reply["object"] == "text_completion"
    assert (
        reply["choices"][0]["text"]
        == client.completions.create(model=MODEL, **prompt).choices[0].text
    )
    with httpx.stream("POST", url, json={**chat, "stream": True}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert [line for line in response.iter_lines() if line][-1] == "data: [DONE]"
    bad = httpx.post(url, json={"input": "embed me"}, timeout=60)
    assert bad.status_code == 400 and "neither" in bad.json()["error"]["message"]


def test_malformed_json_and_suffix(smollm2_server: Server) -> None:
    bad = httpx.post(
        f"{smollm2_server.url}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    suffix = httpx.post(f"{smollm2_server.url}/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert suffix.status_code == 400 and "suffix" in suffix.json()["error"]["message"]
    embeds = httpx.post(f"{smollm2_server.url}/v1/completions", json={"prompt_embeds": "AAAA"})
    assert embeds.status_code == 400 and embeds.json()["error"]["param"] == "prompt_embeds"
    assert "--enable-prompt-embeds" in embeds.json()["error"]["message"]


def test_tokenize_detokenize_and_probes(smollm2_server: Server) -> None:
    url = smollm2_server.url
    tokens = httpx.post(
        f"{url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}
    ).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    assert (
        httpx.post(f"{url}/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
        == "Hello world"
    )
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/ping").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]
    assert httpx.get(f"{url}/load").json() == {"server_load": 0}


def metrics_once_idle(server: Server) -> str:
    """/metrics after /load has fallen to 0 requests in flight (waits up to 5 s for it)."""
    for _ in range(100):
        if httpx.get(f"{server.url}/load").json()["server_load"] == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert httpx.get(f"{server.url}/load").json()["server_load"] == 0
    return httpx.get(f"{server.url}/metrics").text


def test_disconnect_mid_stream_frees_the_request(smollm2_server: Server) -> None:
    body = {"prompt": "Count forever:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{smollm2_server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert httpx.get(f"{smollm2_server.url}/load").json()["server_load"] == 1
    text = metrics_once_idle(smollm2_server)
    assert metric(text, "lmserve:num_requests_running", model_name=MODEL) == 0
    assert metric(text, "lmserve:kv_cache_usage_perc", model_name=MODEL) == 0


def test_disconnect_before_a_whole_answer_frees_the_request(smollm2_server: Server) -> None:
    body = {"prompt": "Count forever:", "max_tokens": 1000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{smollm2_server.url}/v1/completions", json=body, timeout=2)
    text = metrics_once_idle(smollm2_server)
    assert metric(text, "lmserve:kv_cache_usage_perc", model_name=MODEL) == 0


def test_concurrent_streaming_clients(smollm2_server: Server) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say the number {i}."}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        text, finish = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def run() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(base_url=f"{smollm2_server.url}/v1", api_key="x")
        return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run())
    assert all(text and finish in ("stop", "length") for text, finish in results)


def test_completion_stream_with_continuous_usage(smollm2_server: Server) -> None:
    body = {
        "prompt": "Hello",
        "max_tokens": 4,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    with httpx.stream("POST", f"{smollm2_server.url}/v1/completions", json=body, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    counts = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert counts == sorted(counts) and counts[-1] == 4
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_api_key(tiny_model_dirs) -> None:
    server = start_server(
        str(tiny_model_dirs["llama"]), "--api-key", "sekret", "--kv-cache-memory-gb", "0.01"
    )
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 2}
        missing = httpx.post(f"{server.url}/v1/completions", json=body)
        wrong = httpx.post(
            f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}
        )
        right = httpx.post(
            f"{server.url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"}
        )
        assert missing.status_code == wrong.status_code == 401
        assert json.loads(missing.text)["error"]["code"] == "invalid_api_key"
        assert right.status_code == 200 and right.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key
    finally:
        stop_server(server)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def test_metrics_after_traffic(client: openai.OpenAI, smollm2_server: Server) -> None:
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    text = httpx.get(f"{smollm2_server.url}/metrics").text
    assert metric(text, "lmserve:num_requests_running", model_name=MODEL) == 0
    assert metric(text, "lmserve:kv_cache_usage_perc", model_name=MODEL) == 0
    assert metric(text, "lmserve:generation_tokens_total", model_name=MODEL) > 0
    assert metric(text, "lmserve:request_success_total", finished_reason="stop") >= 2
    assert metric(text, "lmserve:time_to_first_token_seconds_count", model_name=MODEL) >= 2
    # the second identical chat hit the prefix cache
    assert metric(text, "lmserve:prefix_cache_hits_total", model_name=MODEL) > 0
    assert metric(text, "lmserve:prefix_cache_queries_total", model_name=MODEL) > 0
    for name in (
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert metric(text, f"lmserve:{name}_count", model_name=MODEL) >= 2


@pytest.mark.parametrize(
    "extra",
    [
        {"top_k": 5},
        {"min_p": 0.1},
        {"repetition_penalty": 1.2},
        {"min_tokens": 2},
        {"ignore_eos": True},
        {"stop_token_ids": [2]},
        {"include_stop_str_in_output": True},
        {"skip_special_tokens": False},
        {"spaces_between_special_tokens": False},
        {"add_special_tokens": True},
        {"chat_template_kwargs": {"foo": 1}},
        {"priority": 1},
        {"request_id": "mine-1"},
        {"user": "alice"},
        {"cache_salt": "tenant-a"},
        {"truncate_prompt_tokens": 8},
        {"echo": True},
        {"max_completion_tokens": 3},
        {"presence_penalty": 0.5, "frequency_penalty": 0.5},
        {"logit_bias": {"2": -100}},
        {"metadata": {"k": "v"}, "store": False, "service_tier": "auto"},
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}, "stream": True},
    ],
)
def test_every_extra_field_is_accepted(smollm2_server: Server, extra: dict) -> None:
    body = {"messages": QUESTION, "max_tokens": 4, **extra}
    response = httpx.post(f"{smollm2_server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text


def test_field_effects(smollm2_server: Server, client: openai.OpenAI) -> None:
    url = smollm2_server.url
    mine = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": QUESTION, "max_tokens": 2, "request_id": "mine-2"},
    ).json()
    assert mine["id"] == "chatcmpl-mine-2"
    truncated = httpx.post(
        f"{url}/v1/completions",
        json={
            "prompt": "one two three four five six seven",
            "max_tokens": 1,
            "truncate_prompt_tokens": 3,
        },
    ).json()
    assert truncated["usage"]["prompt_tokens"] == 3
    ids = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "Hi", "max_tokens": 2, "return_token_ids": True, "prompt_logprobs": 1},
    ).json()
    choice = ids["choices"][0]
    assert len(choice["token_ids"]) == 2 and choice["prompt_token_ids"]
    assert choice["prompt_logprobs"][0] is None and len(choice["prompt_logprobs"]) == len(
        choice["prompt_token_ids"]
    )
    capped = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_completion_tokens=3, max_tokens=50, temperature=0
    )
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    forced = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=3,
        temperature=0,
        extra_body={"min_tokens": 3, "ignore_eos": True},
    )
    assert forced.usage.completion_tokens == 3


def test_n_choices_stream_with_indexes(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=QUESTION, n=3, max_tokens=6, temperature=1.0, seed=3, stream=True
        )
    )
    texts: dict[int, str] = {}
    finishes: list[int] = []
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finishes, "a chunk after the choice's finish"
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes.append(choice.index)
    assert set(texts) == {0, 1, 2} and sorted(finishes) == [0, 1, 2]
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, n=3, max_tokens=6, temperature=1.0, seed=3
    )
    assert [whole.choices[i].message.content for i in range(3)] == [texts[i] for i in range(3)]


def test_openapi_documents_the_endpoint_bodies(smollm2_server: Server) -> None:
    """The endpoint table's bodies are parsed by the edge, not FastAPI: /docs still shows them."""
    document = httpx.get(f"{smollm2_server.url}/openapi.json").json()
    schemas = document["components"]["schemas"]
    for path, model in [("/v1/chat/completions", "ChatCompletionRequest"),
                        ("/v1/messages", "MessagesRequest"), ("/tokenize", "TokenizeRequest")]:  # fmt: skip
        body = document["paths"][path]["post"]["requestBody"]
        assert body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"
        }
        assert "messages" in schemas[model]["properties"]
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(document))
    assert set(refs) <= set(schemas)  # every nested model is there too


def test_a_text_model_refuses_transcriptions(smollm2_server: Server, speech_dir) -> None:
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        response = httpx.post(
            f"{smollm2_server.url}{path}",
            files={"file": ("b.wav", (speech_dir / "beckett.wav").read_bytes())},
        )
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "model"
        assert "not a speech-to-text model" in error["message"]
