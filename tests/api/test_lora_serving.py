"""LoRA adapters through a real `lmserve serve` and the official openai client: adapters named by
--lora-modules (both forms) and loaded at runtime, each answering with PEFT's tokens."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.engine.test_llm import random_prompts
from tests.lora.test_lora import ALL_TARGETS, NUM_NEW, make_adapter, peft_greedy


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("served_adapters")
    llama = tiny_model_dirs["llama"]
    return {
        "all": make_adapter(llama, root / "all", 11, 8, ALL_TARGETS),
        "qv": make_adapter(llama, root / "qv", 12, 4, ["q_proj", "v_proj"]),
        "late": make_adapter(llama, root / "late", 13, 8, ["o_proj", "down_proj"]),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dirs, adapters) -> Iterator[Server]:
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    try:
        server = start_server(
            str(tiny_model_dirs["llama"]),
            "--served-model-name",
            "base",
            "--enable-lora",
            "--max-loras",
            "2",
            "--kv-cache-memory-gb",
            "0.01",
            "--lora-modules",
            f"all={adapters['all']}",
            f'{{"name": "qv", "path": "{adapters["qv"]}"}}',
        )
    finally:
        del os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]
    yield server
    stop_server(server)


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def _tokens(
    client: openai.OpenAI, model: str, prompt: list[int], stream: bool = False
) -> list[int]:
    extra = {"return_token_ids": True, "ignore_eos": True}
    kwargs = dict(model=model, prompt=prompt, max_tokens=NUM_NEW, temperature=0, extra_body=extra)
    if not stream:
        return client.completions.create(**kwargs).choices[0].model_extra["token_ids"]
    tokens = []
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices:
            tokens += chunk.choices[0].model_extra.get("token_ids") or []
    return tokens


def test_models_lists_the_adapters_under_the_base(server, adapters) -> None:
    cards = {m.id: m for m in _client(server).models.list().data}
    assert {"base", "all", "qv"} <= set(cards)
    assert cards["all"].model_extra["parent"] == "base"
    assert cards["all"].model_extra["root"] == str(adapters["all"])
    assert cards["base"].model_extra["parent"] is None


def test_each_adapter_answers_with_peft_tokens(server, tiny_model_dirs, adapters) -> None:
    client = _client(server)
    base_dir = tiny_model_dirs["llama"]
    prompt = random_prompts([21], seed=5)[0]
    assert _tokens(client, "all", prompt) == peft_greedy(base_dir, adapters["all"], [prompt])[0]
    assert (
        _tokens(client, "qv", prompt, stream=True)
        == peft_greedy(base_dir, adapters["qv"], [prompt])[0]
    )
    assert _tokens(client, "base", prompt) == peft_greedy(base_dir, None, [prompt])[0]


def test_adapters_load_and_unload_at_runtime(server, tiny_model_dirs, adapters) -> None:
    client = _client(server)
    prompt = random_prompts([9], seed=6)[0]
    with pytest.raises(openai.NotFoundError):
        _tokens(client, "late", prompt)
    load = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "late", "lora_path": str(adapters["late"])},
    )
    assert load.status_code == 200, load.text
    expected = peft_greedy(tiny_model_dirs["llama"], adapters["late"], [prompt])[0]
    assert _tokens(client, "late", prompt) == expected
    again = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "late", "lora_path": str(adapters["late"])},
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "nowhere", "lora_path": "/no/such/adapter"},
    )
    assert bad.status_code == 404 and "No adapter found" in bad.json()["error"]["message"]
    unload = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert unload.status_code == 200
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        _tokens(client, "late", prompt)
    gone = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert gone.status_code == 404
    assert _tokens(client, "all", prompt)  # still serving


def test_an_adapter_whose_files_vanished_fails_its_requests_only(
    server, tiny_model_dirs, adapters, tmp_path
) -> None:
    """Its files are read when it first runs: gone by then, the engine core fails the requests
    that use it (a 500 saying so) and goes on serving the others, exactly."""
    client = _client(server)
    vanishing = shutil.copytree(adapters["late"], tmp_path / "vanishing")
    load = httpx.post(
        f"{server.url}/v1/load_lora_adapter",
        json={"lora_name": "vanishing", "lora_path": str(vanishing)},
    )
    assert load.status_code == 200, load.text
    shutil.rmtree(vanishing)
    base_dir = tiny_model_dirs["llama"]
    prompts = random_prompts([17, 23], seed=8)
    with ThreadPoolExecutor(2) as pool:
        base = pool.submit(_tokens, client, "base", prompts[0], True)
        with pytest.raises(openai.InternalServerError, match="failed while running"):
            _tokens(client, "vanishing", prompts[1])
        assert base.result() == peft_greedy(base_dir, None, [prompts[0]])[0]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert (
        _tokens(client, "all", prompts[1]) == peft_greedy(base_dir, adapters["all"], prompts[1:])[0]
    )
    metrics = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'lmserve:request_success_total\{.*finished_reason="error".*\} 1\.0', metrics)
    assert re.search(r"lmserve:num_requests_running\{.*\} 0\.0", metrics)
    assert re.search(r"lmserve:kv_cache_usage_perc\{.*\} 0\.0", metrics)


def test_runtime_updates_are_off_unless_asked_for(tiny_model_dirs, adapters) -> None:
    server = start_server(
        str(tiny_model_dirs["llama"]), "--enable-lora", "--kv-cache-memory-gb", "0.01"
    )
    try:
        load = httpx.post(
            f"{server.url}/v1/load_lora_adapter",
            json={"lora_name": "all", "lora_path": str(adapters["all"])},
        )
        assert load.status_code == 404
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in load.json()["error"]["message"]
    finally:
        stop_server(server)


def test_lora_modules_without_enable_lora_is_a_startup_error(tiny_model_dirs, adapters) -> None:
    with pytest.raises(RuntimeError, match="--enable-lora"):
        start_server(
            str(tiny_model_dirs["llama"]),
            "--kv-cache-memory-gb",
            "0.01",
            "--lora-modules",
            f"all={adapters['all']}",
        )
