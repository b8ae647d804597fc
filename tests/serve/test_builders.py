"""build_openai_app on a real local Ray: two models behind one router, driven by the openai
client. Ray starts once for the module (a few seconds) with the machine's own CPUs; nothing about
Ray is mocked. The two models reserve half a CPU each (as a user serving several models on a
small machine would set it), so the other tests' applications fit beside them on 2 cores."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lmserve.api.replies import Event  # noqa: E402
from lmserve.serve import LLMConfig, build_llm_deployment, build_openai_app  # noqa: E402
from tests.api.conftest import Server, free_port, start_server, stop_server  # noqa: E402
from tests.conftest import chromium  # noqa: E402
from tests.tracing.test_otel import PARENT_ID, TRACE_ID, Collector  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMALL_ENGINE = {"max_model_len": 512, "kv_cache_memory_gb": 0.05}
HALF_CPU = {"ray_actor_options": {"num_cpus": 0.5}}
USER_X = [{"role": "user", "content": "x"}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def traces() -> Iterator[tuple[int, Collector]]:
    """An OTLP collector the tiny model's replica sends its request spans to."""
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    port, service = free_port(), Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, service
    server.stop(grace=None)


@pytest.fixture(scope="module")
def app_url(smollm2_dir: Path, tiny_model_dirs: dict[str, Path], traces) -> Iterator[str]:
    port = free_port()
    # Serve pushes autoscaling metrics every 10 s by default: too slow for a test's burst.
    for name in ("REPLICA", "HANDLE"):
        os.environ[f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_openai_app(
        {
            "llm_configs": [
                LLMConfig(
                    model_loading_config={"model_id": SMOLLM2},
                    engine_kwargs=SMALL_ENGINE,
                    deployment_config=HALF_CPU,
                ),
                {
                    "model_loading_config": {
                        "model_id": "tiny",
                        "model_source": str(tiny_model_dirs["llama"]),
                    },
                    "engine_kwargs": {
                        **SMALL_ENGINE,
                        "otlp_traces_endpoint": f"http://127.0.0.1:{traces[0]}",
                    },
                    "deployment_config": HALF_CPU,
                },
            ]
        }
    )
    serve.run(app, name="llm", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(app_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app_url}/v1", api_key="unused")


def test_models_lists_both(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == sorted([SMOLLM2, "tiny"])
    assert client.models.retrieve("tiny").id == "tiny"


def test_each_model_answers_by_id_streaming_and_not(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model=SMOLLM2, messages=question, temperature=0, max_tokens=16
    )
    assert "Paris" in reply.choices[0].message.content and reply.model == SMOLLM2
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=SMOLLM2, messages=question, temperature=0, max_tokens=16, stream=True
        )
        if chunk.choices
    )
    assert streamed == reply.choices[0].message.content
    tiny = client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0)
    assert len(tiny.choices[0].text) >= 0 and tiny.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model="tiny", prompt=[1, 2, 3], max_tokens=5, temperature=0, stream=True
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_engine_metrics_on_rays_prometheus_port(client: openai.OpenAI) -> None:
    """log_engine_metrics (on by default, as Ray's): each replica's lmserve:* series appear on
    the node's metrics export port as ray_lmserve_*, labelled by model."""
    for model in ("tiny", SMOLLM2):
        client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=5, temperature=0)
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline, seen = time.monotonic() + 60, {}
    while time.monotonic() < deadline and len(seen) < 2:
        for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith("ray_lmserve_generation_tokens_total{"):
                model = line.split('model_name="', 1)[1].split('"', 1)[0]
                seen[model] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    assert seen.get("tiny", 0) >= 5 and seen.get(SMOLLM2, 0) >= 5, seen


def test_router_metrics_and_dashboard_cover_every_replica(app_url: str) -> None:
    """The router's /metrics gives each replica's engine series (read back from Ray's
    Prometheus endpoints) under their lmserve:* names, and its /dashboard draws them per model:
    non-zero tokens/s for the model under load, then idle (rates over Ray's 10 s reports)."""
    with chromium() as browser:  # closed after: this module's other tests run asyncio loops
        _watch_the_dashboard(app_url, browser)


def _watch_the_dashboard(app_url: str, browser) -> None:
    page = browser.new_page()
    page.goto(app_url + "/dashboard")
    card_value = (
        "(metric) => { const m = [...document.querySelectorAll('.model')].find("
        "(d) => d.querySelector('h2').textContent === 'tiny'); "
        "return m ? Number(m.querySelector(`.card[data-metric=${metric}]`).dataset.value) : -1; }"
    )
    stop = threading.Event()

    def load() -> None:
        client = openai.OpenAI(base_url=f"{app_url}/v1", api_key="none", max_retries=0)
        while not stop.is_set():
            client.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=64,
                                      extra_body={"ignore_eos": True})  # fmt: skip

    worker = threading.Thread(target=load)
    worker.start()
    try:
        page.wait_for_function(f"({card_value})('gen') > 0", timeout=90_000)
        busy = page.evaluate(f"({card_value})('gen')")
    finally:
        stop.set()
        worker.join()
    text = httpx.get(f"{app_url}/metrics", timeout=30).text
    tiny = [
        line
        for line in text.splitlines()
        if line.startswith("lmserve:generation_tokens_total{") and 'model_name="tiny"' in line
    ]
    assert tiny and float(tiny[0].rsplit(" ", 1)[1]) > 0
    page.wait_for_function(f"({card_value})('gen') === 0", timeout=90_000)
    assert busy > 1
    page.close()


def test_health_ping_and_load(app_url: str) -> None:
    """/load counts the requests the router is answering: an open stream, until it ends."""
    assert httpx.get(f"{app_url}/health").status_code == 200
    assert httpx.get(f"{app_url}/ping").status_code == 200
    assert httpx.get(f"{app_url}/load").json() == {"server_load": 0}
    body = {
        "model": SMOLLM2,
        "prompt": "Once",
        "max_tokens": 64,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{app_url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{app_url}/load").json() == {"server_load": 1}
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert httpx.get(f"{app_url}/load").json() == {"server_load": 0}


def test_errors_keep_their_status(app_url: str, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    for stream in (False, True):
        bad = httpx.post(
            f"{app_url}/v1/chat/completions",
            json={
                "model": SMOLLM2,
                "messages": [{"role": "user", "content": "x"}],
                "temperature": -1,
                "stream": stream,
            },
            timeout=60,
        )
        assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    unknown = httpx.post(
        f"{app_url}/v1/completions", json={"model": "tiny", "prompt": "x", "bogus": 1}, timeout=60
    )
    assert unknown.status_code == 400 and "bogus" in unknown.json()["error"]["message"]


def test_autoscaling_up_under_a_burst_and_back_when_idle(app_url: str, tiny_model_dirs) -> None:
    scaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
               "upscale_delay_s": 0, "downscale_delay_s": 2, "look_back_period_s": 1,
               "metrics_interval_s": 0.5}  # fmt: skip
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {
                        "model_id": "tiny-scaling",
                        "model_source": str(tiny_model_dirs["llama"]),
                    },
                    "engine_kwargs": SMALL_ENGINE,
                    # two requests per replica, so the burst queues and lasts while a second
                    # replica loads its engine (with 4 a burst on the tiny model could end first)
                    "deployment_config": {
                        "autoscaling_config": scaling,
                        "max_ongoing_requests": 2,
                        **HALF_CPU,
                    },
                }
            ]
        }
    )
    serve.run(app, name="scaling", route_prefix="/scaling")
    try:
        _burst_scales_up_and_back(app_url)
    finally:  # a failure must not leave its replicas holding the CPUs the next tests reserve
        serve.delete("scaling")


def _burst_scales_up_and_back(app_url: str) -> None:
    def replicas() -> int:
        deployments = serve.status().applications["scaling"].deployments
        server = next(d for name, d in deployments.items() if name.startswith("LLMServer"))
        return server.replica_states.get("RUNNING", 0)

    assert replicas() == 1
    body = {"prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True}
    peak = 1
    with ThreadPoolExecutor(48) as pool:
        futures = [
            pool.submit(httpx.post, f"{app_url}/scaling/v1/completions", json=body, timeout=300)
            for _ in range(48)
        ]
        while not all(f.done() for f in futures):
            peak = max(peak, replicas())
            time.sleep(0.5)
        answers = [f.result() for f in futures]
    assert all(
        a.status_code == 200 and a.json()["usage"]["completion_tokens"] == 500 for a in answers
    )
    assert peak == 2
    deadline = time.monotonic() + 60
    while replicas() != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert replicas() == 1


def test_deleting_an_app_ends_its_streams_and_engines(app_url: str, smollm2_dir: Path) -> None:
    """Replica shutdown after Serve's graceful wait: the in-flight stream ends, not hangs, and
    the replica (with the CPU it reserved) is gone. SmolLM2 takes seconds for 400 tokens here,
    longer than the delete."""
    app = build_llm_deployment(
        {
            "model_loading_config": {"model_id": "doomed", "model_source": SMOLLM2},
            "engine_kwargs": SMALL_ENGINE,
            "deployment_config": {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.5},
        }
    )  # fmt: skip
    serve.run(app, name="doomed", route_prefix="/doomed")
    handle = serve.get_app_handle("doomed")
    body = {"model": "doomed", "prompt": "Once upon a time", "max_tokens": 400,
            "ignore_eos": True, "stream": True, "return_token_ids": True}  # fmt: skip
    token_ids: list[int] = []

    async def stream_until_deleted() -> None:
        deleted = False
        async for item in handle.options(stream=True).answer.remote("completions", body):
            if isinstance(item, Event):
                token_ids.extend(item.data.choices[0].token_ids)
            if token_ids and not deleted:  # Serve's delete blocks: not on the stream's loop
                deleted = True
                await asyncio.to_thread(serve.delete, "doomed", _blocking=False)

    start = time.monotonic()
    with contextlib.suppress(Exception):  # the stream may end with the replica's error
        asyncio.run(asyncio.wait_for(stream_until_deleted(), timeout=60))
    assert time.monotonic() - start < 60
    assert 0 < len(token_ids) < 400  # cut short, not run to the end after the delete
    deadline = time.monotonic() + 60
    while "doomed" in serve.status().applications and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "doomed" not in serve.status().applications


def _placed_and_answering(config: dict[str, Any], name: str) -> list[tuple[dict, str]]:
    """Deploy one tiny model's `config` as app `name`; the (bundles, strategy) of each placement
    group the deployment created, once it has answered a completion through its handle."""
    before = set(ray.util.placement_group_table())
    serve.run(build_llm_deployment(config), name=name, route_prefix=f"/{name}")
    try:
        created = [
            (group["bundles"], group["strategy"])
            for key, group in ray.util.placement_group_table().items()
            if key not in before and group["state"] == "CREATED"
        ]
        model = config["model_loading_config"]["model_id"]
        body = {"model": model, "prompt": [1, 2], "max_tokens": 3}
        handle = serve.get_app_handle(name)
        (answer,) = list(handle.options(stream=True).answer.remote("completions", body))
        assert answer.status == 200 and answer.body.usage.completion_tokens == 3
        return created
    finally:
        serve.delete(name)


def test_placement_group_config_reserves_the_bundles(app_url: str, tiny_model_dirs) -> None:
    created = _placed_and_answering(
        {
            "model_loading_config": {"model_id": "tiny", "model_source": str(tiny_model_dirs["llama"])},
            "engine_kwargs": SMALL_ENGINE,
            "placement_group_config": {"bundles": [{"CPU": 0.5}, {"CPU": 0.25}], "strategy": "PACK"},
            "deployment_config": HALF_CPU,
        },
        "placed",
    )  # fmt: skip
    assert created == [({0: {"CPU": 0.5}, 1: {"CPU": 0.25}}, "PACK")]


def test_tensor_parallel_replica_reserves_one_bundle_per_rank(
    app_url: str, tiny_model_dirs
) -> None:
    """engine_kwargs tensor_parallel_size=2: the replica's placement group holds one bundle per
    rank, packed on one node (its other rank is a process it starts beside itself), and the
    model answers through it."""
    created = _placed_and_answering(
        {
            "model_loading_config": {"model_id": "tiny-tp", "model_source": str(tiny_model_dirs["llama"])},
            "engine_kwargs": {**SMALL_ENGINE, "tensor_parallel_size": 2},
            "deployment_config": HALF_CPU,
        },
        "sharded",
    )  # fmt: skip
    assert created == [({0: {"CPU": 0.5}, 1: {"CPU": 0.5}}, "STRICT_PACK")]


def test_a_models_vllm_api_key_guards_the_ingress(app_url: str, tiny_model_dirs) -> None:
    """VLLM_API_KEY in a model's runtime_env, as vLLM users set it (Ray Serve LLM itself
    ignores it and serves open): every /v1 route of the router wants it; probes do not."""
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {
                        "model_id": "keyed",
                        "model_source": str(tiny_model_dirs["llama"]),
                    },
                    "engine_kwargs": SMALL_ENGINE,
                    "deployment_config": HALF_CPU,
                    "runtime_env": {"env_vars": {"VLLM_API_KEY": "ray-key"}},
                }
            ]
        }
    )
    serve.run(app, name="keyed", route_prefix="/keyed")
    try:
        base = f"{app_url}/keyed"
        body = {"model": "keyed", "prompt": [1, 2], "max_tokens": 2}
        for key, status in ((None, 401), ("wrong", 401), ("ray-key", 200)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            assert httpx.get(f"{base}/v1/models", headers=headers).status_code == status
            answer = httpx.post(f"{base}/v1/completions", json=body, headers=headers, timeout=60)
            assert answer.status_code == status, answer.text
        assert httpx.get(f"{base}/health").status_code == 200
        keyed = openai.OpenAI(base_url=f"{base}/v1", api_key="ray-key", max_retries=0)
        assert [m.id for m in keyed.models.list().data] == ["keyed"]
        assert httpx.get(f"{app_url}/v1/models").status_code == 200  # other apps stay open
    finally:
        serve.delete("keyed")


def test_pooling_models_through_the_router(app_url: str, minilm_dir, tiny_pooling_dirs) -> None:
    """engine_kwargs={"task": "embed"} as seed 000 deploys an embedder, beside a cross-encoder
    with task="score": /v1/embeddings, /score and /v1/rerank through build_openai_app, each
    routed by its body's model, equal sentence-transformers and the offline engine."""
    from sentence_transformers import SentenceTransformer

    from lmserve import LLM
    from tests.models.test_bert import sentences

    cross = str(tiny_pooling_dirs["bert_cross"])
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {"model_id": "minilm", "model_source": str(minilm_dir)},
                    "engine_kwargs": {"task": "embed"},
                    "deployment_config": HALF_CPU,
                },
                {
                    "model_loading_config": {"model_id": "cross", "model_source": cross},
                    "engine_kwargs": {"task": "score"},
                    "deployment_config": HALF_CPU,
                },
            ]
        }
    )
    serve.run(app, name="embedder", route_prefix="/embedder")
    try:
        client = openai.OpenAI(base_url=f"{app_url}/embedder/v1", api_key="x", max_retries=0)
        texts = sentences(200)  # empty to far past 256 tokens (truncated), unicode
        answer = client.embeddings.create(
            model="minilm", input=texts, extra_body={"truncate_prompt_tokens": -1}
        )
        reference = SentenceTransformer(str(minilm_dir), device="cpu")
        expected = reference.encode(texts, normalize_embeddings=True)
        got = [d.embedding for d in answer.data]
        assert max(abs(a - b) for g, e in zip(got, expected, strict=True)
                   for a, b in zip(g, e, strict=True)) < 1e-5  # fmt: skip
        documents = ["Paris is in France.", "Bananas are yellow."]
        scored = httpx.post(f"{app_url}/embedder/score", timeout=60, json={
            "model": "cross", "text_1": "Where is Paris?", "text_2": documents}).json()  # fmt: skip
        reranked = httpx.post(f"{app_url}/embedder/v1/rerank", timeout=60, json={
            "model": "minilm", "query": "Where is Paris?", "documents": documents}).json()  # fmt: skip
    finally:
        serve.delete("embedder")
    offline = LLM(cross).score("Where is Paris?", documents, use_tqdm=False)
    assert [d["score"] for d in scored["data"]] == pytest.approx(
        [o.outputs.score for o in offline], abs=1e-5
    )
    vectors = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        ["Where is Paris?", *documents], normalize_embeddings=True
    )
    cosines = [float(vectors[0] @ vectors[i]) for i in (1, 2)]
    assert [r["index"] for r in reranked["results"]] == sorted((0, 1), key=lambda i: -cosines[i])
    assert sorted(r["relevance_score"] for r in reranked["results"]) == pytest.approx(
        sorted(cosines), abs=1e-5
    )


def test_an_engine_that_does_not_start_in_time_fails_the_deployment(
    app_url: str, tiny_model_dirs
) -> None:
    app = build_llm_deployment(
        {
            "model_loading_config": {"model_id": "slow", "model_source": str(tiny_model_dirs["llama"])},
            "engine_kwargs": SMALL_ENGINE,
            "engine_start_timeout_s": 0.001,
        }
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="slow failed"):
        serve.run(app, name="slow", route_prefix="/slow")
    (deployment,) = serve.status().applications["slow"].deployments.values()
    assert "did not finish loading within 0.001 s" in deployment.message
    assert "engine_start_timeout_s" in deployment.message  # says what to raise
    serve.delete("slow")


def test_base_colon_adapter_is_multiplexed_to_the_base_model(
    app_url: str, tiny_model_dirs, tmp_path
) -> None:
    """Ray Serve LLM's LoRA form: `model_id:adapter` loads dynamic_lora_loading_path/adapter on
    the replica it lands on, and answers with PEFT's tokens for that adapter."""
    from tests.engine.test_llm import random_prompts
    from tests.lora.test_lora import ALL_TARGETS, NUM_NEW, make_adapter, peft_greedy

    base = tiny_model_dirs["llama"]
    adapters = {
        "sql": make_adapter(base, tmp_path / "sql", 21, 8, ALL_TARGETS),
        "chat": make_adapter(base, tmp_path / "chat", 22, 4, ["q_proj", "v_proj"]),
    }
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {"model_id": "tiny", "model_source": str(base)},
                    "engine_kwargs": SMALL_ENGINE,
                    # one at a time: every switch evicts the other adapter from the replica
                    "lora_config": {
                        "dynamic_lora_loading_path": str(tmp_path),
                        "max_num_adapters_per_replica": 1,
                    },
                }
            ]
        }
    )
    serve.run(app, name="lora", route_prefix="/lora")
    try:
        client = openai.OpenAI(base_url=f"{app_url}/lora/v1", api_key="unused", max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert ids == {"tiny", "tiny:sql", "tiny:chat"}
        prompt = random_prompts([13], seed=7)[0]
        extra = {"return_token_ids": True, "ignore_eos": True}
        for name in ["sql", "chat", "sql"]:
            path = adapters[name]
            answer = client.completions.create(
                model=f"tiny:{name}", prompt=prompt, max_tokens=NUM_NEW, temperature=0,
                extra_body=extra,
            )  # fmt: skip
            assert answer.model == f"tiny:{name}"
            assert (
                answer.choices[0].model_extra["token_ids"] == peft_greedy(base, path, [prompt])[0]
            )
        streamed = client.completions.create(
            model="tiny:sql", prompt=prompt, max_tokens=NUM_NEW, temperature=0, stream=True,
            extra_body=extra,
        )  # fmt: skip
        tokens = [t for c in streamed if c.choices for t in c.choices[0].model_extra["token_ids"]]
        assert tokens == peft_greedy(base, adapters["sql"], [prompt])[0]
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny:nope", prompt=prompt, max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="tiny:../sql", prompt=prompt, max_tokens=2)
    finally:
        serve.delete("lora")


@pytest.fixture(scope="module")
def single_server(smollm2_dir: Path) -> Iterator[Server]:
    """`lmserve serve` on the same model and limits as the Ray app's SmolLM2: the reference
    for what the ingress must answer."""
    server = start_server("--max-model-len", "512", "--kv-cache-memory-gb", "0.05")
    yield server
    stop_server(server)


LONG_PROMPT = "hello " * 600  # past max_model_len 512
BAD_REQUESTS = [
    ("/v1/chat/completions", {"model": SMOLLM2, "messages": USER_X, "temperature": -1}),
    ("/v1/chat/completions", {"model": SMOLLM2, "messages": USER_X, "bogus": 1}),
    ("/v1/chat/completions", {"model": SMOLLM2, "messages": USER_X, "stream": True, "n": 0}),
    ("/v1/chat/completions", {"model": "nope", "messages": USER_X}),
    ("/v1/chat/completions", {"model": SMOLLM2}),
    ("/v1/chat/completions", [1, 2]),
    ("/v1/chat/completions", b"{not json"),
    ("/v1/completions", {"model": SMOLLM2, "prompt": LONG_PROMPT}),
    ("/v1/completions", {"model": SMOLLM2, "prompt": "a", "max_tokens": 600}),
    ("/v1/responses", {"model": SMOLLM2, "input": "x", "previous_response_id": "resp_1"}),
    ("/v1/responses", {"model": SMOLLM2, "input": 5}),
    ("/v1/messages", {"model": SMOLLM2, "messages": USER_X}),
    ("/v1/messages", {"model": "nope", "max_tokens": 3, "messages": USER_X}),
    ("/v1/messages", b"{not json"),
    ("/v1/messages/count_tokens", {"model": SMOLLM2}),
    ("/tokenize", {"model": SMOLLM2}),
    ("/detokenize", {"model": SMOLLM2, "tokens": [-1]}),
    ("/invocations", {"model": SMOLLM2, "neither": True}),
]


@pytest.mark.parametrize(("path", "body"), BAD_REQUESTS, ids=[p for p, _ in BAD_REQUESTS])
def test_errors_answer_as_the_single_server_does(
    app_url: str, single_server: Server, path: str, body: Any
) -> None:
    def post(url: str) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.post(url + path, content=body, timeout=60)
        return httpx.post(url + path, json=body, timeout=60)

    expected, got = post(single_server.url), post(app_url)
    assert 400 <= expected.status_code < 500
    assert (got.status_code, got.json()) == (expected.status_code, expected.json())


def test_tokenizers_and_invocations_answer_as_the_single_server_does(
    app_url: str, single_server: Server
) -> None:
    bodies = [
        ("/tokenize", {"model": SMOLLM2, "prompt": "Hello world", "return_token_strs": True}),
        ("/tokenize", {"model": SMOLLM2, "messages": FRANCE, "add_generation_prompt": True}),
        ("/detokenize", {"model": SMOLLM2, "tokens": [19556, 905]}),
        ("/v1/messages/count_tokens", {"model": SMOLLM2, "messages": FRANCE}),
    ]
    for path, body in bodies:
        expected = httpx.post(single_server.url + path, json=body, timeout=60)
        got = httpx.post(app_url + path, json=body, timeout=60)
        assert expected.status_code == 200 and got.json() == expected.json(), path
    missing = httpx.get(f"{app_url}/v1/responses/resp_1", timeout=10)
    reference = httpx.get(f"{single_server.url}/v1/responses/resp_1", timeout=10)
    assert (missing.status_code, missing.json()) == (404, reference.json())
    invocation = {"model": SMOLLM2, "messages": FRANCE, "max_tokens": 12, "temperature": 0}
    expected = httpx.post(single_server.url + "/invocations", json=invocation, timeout=60).json()
    got = httpx.post(app_url + "/invocations", json=invocation, timeout=60).json()
    assert got["choices"][0]["message"] == expected["choices"][0]["message"]
    assert got["usage"] == expected["usage"]


def test_responses_api_through_the_router(client: openai.OpenAI) -> None:
    whole = client.responses.create(
        model=SMOLLM2, input="What is the capital of France?", temperature=0, max_output_tokens=16
    )
    assert whole.model == SMOLLM2 and "Paris" in whole.output_text
    with client.responses.stream(
        model=SMOLLM2, input="What is the capital of France?", temperature=0, max_output_tokens=16
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == f"response.{whole.status}"
    assert final.output_text == whole.output_text and final.status == whole.status
    assert final.usage.output_tokens == whole.usage.output_tokens
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.responses.create(model="tiny", input="hi", max_output_tokens=3)


def test_messages_api_through_the_router(app_url: str) -> None:
    claude = anthropic.Anthropic(base_url=app_url, api_key="unused", max_retries=0)
    greedy = {"temperature": 0}
    whole = claude.messages.create(model=SMOLLM2, max_tokens=16, messages=FRANCE, extra_body=greedy)
    assert whole.model == SMOLLM2 and "Paris" in whole.content[0].text
    with claude.messages.stream(
        model=SMOLLM2, max_tokens=16, messages=FRANCE, extra_body=greedy
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.usage.output_tokens == whole.usage.output_tokens
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="nope", max_tokens=3, messages=FRANCE)


@pytest.mark.parametrize(
    ("name", "engine_extra", "deployment_extra", "says"),
    [
        # the replica's own admission: vLLM's engine argument, in engine_kwargs; and SSE pings
        (
            "admission",
            {"max_num_queued_reqs": 3, "sse_keep_alive_interval": 0.02},
            {},
            "max-num-queued-reqs",
        ),
        # Serve's queue in front of the replica
        ("backpressure", {}, {"max_ongoing_requests": 1, "max_queued_requests": 1}, "overloaded"),
    ],
)
def test_a_burst_through_the_router_gets_200s_and_503s(
    app_url: str, tiny_model_dirs, name: str, engine_extra: dict, deployment_extra: dict, says: str
) -> None:
    app = build_openai_app(
        {
            "llm_configs": [
                {
                    "model_loading_config": {
                        "model_id": name, "model_source": str(tiny_model_dirs["llama"])
                    },
                    "engine_kwargs": {**SMALL_ENGINE, "max_num_seqs": 2, **engine_extra},
                    "deployment_config": {**HALF_CPU, **deployment_extra},
                }
            ]
        }
    )  # fmt: skip
    serve.run(app, name=name, route_prefix=f"/{name}")
    try:
        url = f"{app_url}/{name}/v1/completions"
        body = {"model": name, "prompt": [1, 2, 3], "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda _: httpx.post(url, json=body, timeout=120), range(12)))
        statuses = [a.status_code for a in answers]
        assert set(statuses) == {200, 503}, statuses
        for answer in answers:
            if answer.status_code == 503:
                error = answer.json()["error"]
                assert error["type"] == "ServiceUnavailableError" and says in error["message"]
                assert answer.headers["retry-after"] == "1"
            else:
                assert answer.json()["usage"]["completion_tokens"] == 200
        after = httpx.post(url, json={**body, "max_tokens": 3}, timeout=60)
        assert after.status_code == 200  # nothing left counted as in flight
        if "sse_keep_alive_interval" in engine_extra:
            lines = _stream_behind_two_running(url, body)
            assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
            first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
            assert lines.index(": keep-alive") < first_data  # pinged while it waited
    finally:
        serve.delete(name)


def _stream_behind_two_running(url: str, body: dict) -> list[str]:
    """The SSE lines of a stream that waits for one of two running requests to finish."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            long = {**body, "max_tokens": 500}
            running = [asyncio.ensure_future(client.post(url, json=long)) for _ in range(2)]
            await asyncio.sleep(0.1)  # both running: the stream waits for a slot
            streamed = {**body, "max_tokens": 3, "stream": True}
            async with client.stream("POST", url, json=streamed) as response:
                lines = [line async for line in response.aiter_lines() if line]
            await asyncio.gather(*running)
            return lines

    return asyncio.run(run())


def test_a_replicas_span_is_parented_on_the_clients_trace(client: openai.OpenAI, traces) -> None:
    """The router passes the client's traceparent to the replica, whose engine exports the
    request's span to the collector under that trace."""
    _, service = traces
    client.completions.create(
        model="tiny", prompt=[3, 4, 5], max_tokens=3,
        extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )  # fmt: skip
    deadline = time.monotonic() + 20  # the batch processor sends every 5 s
    while not any(s.trace_id.hex() == TRACE_ID for s in service.spans):
        assert time.monotonic() < deadline, service.spans
        time.sleep(0.2)
    span = next(s for s in service.spans if s.trace_id.hex() == TRACE_ID)
    assert span.name == "llm_request" and span.parent_span_id.hex() == PARENT_ID


def test_the_router_serves_the_playground(app_url: str, client: openai.OpenAI) -> None:
    """The chat page at / over the router's models (its requests are the API's, as on
    `lmserve serve`); the dashboard beside it, its rates over Ray's 10 s metric reports."""
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and "<title>lmserve playground</title>" in page.text
    dashboard = httpx.get(f"{app_url}/dashboard")
    assert dashboard.status_code == 200 and '<body data-window="12">' in dashboard.text
