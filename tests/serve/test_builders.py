"""build_openai_app on a real local Ray: two models behind one router, driven by the openai
client. Ray starts once for the module (a few seconds); nothing about Ray is mocked."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from lmserve.serve import LLMConfig, build_llm_deployment, build_openai_app  # noqa: E402
from tests.api.conftest import free_port  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMALL_ENGINE = {"max_model_len": 512, "kv_cache_memory_gb": 0.05}


@pytest.fixture(scope="module")
def app_url(smollm2_dir: Path, tiny_model_dirs: dict[str, Path]) -> Iterator[str]:
    port = free_port()
    # Serve pushes autoscaling metrics every 10 s by default: too slow for a test's burst.
    for name in ("REPLICA", "HANDLE"):
        os.environ[f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_openai_app(
        {
            "llm_configs": [
                LLMConfig(model_loading_config={"model_id": SMOLLM2}, engine_kwargs=SMALL_ENGINE),
                {
                    "model_loading_config": {
                        "model_id": "tiny",
                        "model_source": str(tiny_model_dirs["llama"]),
                    },
                    "engine_kwargs": SMALL_ENGINE,
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
                    # few requests per replica, so the burst queues and lasts while a second
                    # replica loads its engine
                    "deployment_config": {"autoscaling_config": scaling, "max_ongoing_requests": 4},
                }
            ]
        }
    )
    serve.run(app, name="scaling", route_prefix="/scaling")

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
    serve.delete("scaling")


def test_deleting_an_app_ends_its_streams_and_engines(app_url: str, tiny_model_dirs) -> None:
    """Replica shutdown after Serve's graceful wait: the in-flight stream ends, not hangs."""
    app = build_llm_deployment(
        {
            "model_loading_config": {"model_id": "tiny", "model_source": str(tiny_model_dirs["llama"])},
            "engine_kwargs": SMALL_ENGINE,
            "deployment_config": {"graceful_shutdown_timeout_s": 1, "graceful_shutdown_wait_loop_s": 0.5},
        }
    )  # fmt: skip
    serve.run(app, name="doomed", route_prefix="/doomed")
    handle = serve.get_app_handle("doomed")
    body = {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 500, "ignore_eos": True,
            "stream": True}  # fmt: skip

    async def stream_until_deleted() -> list[Any]:
        items = []
        async for item in handle.options(stream=True).generate_stream.remote("completions", body):
            items.append(item)
            if len(items) == 3:
                serve.delete("doomed", _blocking=False)
        return items

    start = time.monotonic()
    try:
        items = asyncio.run(asyncio.wait_for(stream_until_deleted(), timeout=60))
    except Exception as exc:  # noqa: BLE001 - the stream may end with the replica's error
        items = [exc]
    assert time.monotonic() - start < 60
    assert len(items) < 500  # cut short, not run to the end after the delete


def test_placement_group_config_reserves_the_bundles(app_url: str, tiny_model_dirs) -> None:
    app = build_llm_deployment(
        {
            "model_loading_config": {"model_id": "tiny", "model_source": str(tiny_model_dirs["llama"])},
            "engine_kwargs": SMALL_ENGINE,
            "placement_group_config": {"bundles": [{"CPU": 1}, {"CPU": 0.5}], "strategy": "PACK"},
        }
    )  # fmt: skip
    before = set(ray.util.placement_group_table())
    serve.run(app, name="placed", route_prefix="/placed")
    try:
        created = [
            group
            for key, group in ray.util.placement_group_table().items()
            if key not in before and group["state"] == "CREATED"
        ]
        assert [(g["bundles"], g["strategy"]) for g in created] == [
            ({0: {"CPU": 1.0}, 1: {"CPU": 0.5}}, "PACK")
        ]
        handle = serve.get_app_handle("placed")
        body = {"model": "tiny", "prompt": [1, 2], "max_tokens": 3}
        status, answer = handle.generate.remote("completions", body).result(timeout_s=60)
        assert status == 200 and answer["usage"]["completion_tokens"] == 3
    finally:
        serve.delete("placed")


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
