"""Tensor parallelism on CPU (gloo): greedy tokens on 2 ranks equal HF transformers' in fp32, for
batched, chunked, preempted and prefix-cached requests; int8, n-gram speculation and logprobs
match one rank; what cannot run on several ranks is refused up front."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.engine.args import create_engine_config
from lmserve.lora.request import LoRARequest
from tests.engine.test_llm import (
    NUM_NEW,
    PreemptionCounter,
    assert_no_blocks_held,
    hf_greedy,
    random_prompts,
    run_greedy,
)

# chunked prefill (8-token steps) and a pool small enough to preempt, with prefix caching on
TIGHT = dict(num_kv_blocks=30, block_size=4, max_model_len=100, max_num_batched_tokens=8)


def assert_same_up_to_a_near_tie(one, two, margin: float = 0.05) -> None:
    """Greedy outputs (with logprobs) equal, or where they part, two's token was nearly one's
    choice too: within `margin` nats of it in one's logprobs. int8 on several ranks scales each
    rank's slice of a row-parallel layer's input and weights on its own, so its rounding differs
    from one rank's by int8's own error."""
    for position, (a, b) in enumerate(zip(one.token_ids, two.token_ids, strict=True)):
        if a != b:
            chosen = one.logprobs[position]
            assert b in chosen, f"position {position}: {b} is not among one rank's top tokens"
            assert chosen[a].logprob - chosen[b].logprob < margin, f"position {position}"
            return


def _workers(llm: LLM) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid in llm.engine_core.runner.worker_pids]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_two_ranks_greedy_matches_hf(tiny_model_dirs, hf_models, kind: str) -> None:
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    expected = [hf_greedy(hf_models[kind], p, NUM_NEW) for p in prompts]
    threads = torch.get_num_threads()
    llm = LLM(str(tiny_model_dirs[kind]), tensor_parallel_size=2, **TIGHT)
    workers = _workers(llm)
    try:
        assert llm.engine_core.runner.num_blocks == 30  # every rank holds the same blocks
        llm.step_hook = hook = PreemptionCounter(llm)
        assert run_greedy(llm, prompts[:1]) == expected[:1]
        assert run_greedy(llm, prompts) == expected
        assert hook.preempted == (kind != "mistral")  # (Mistral's window gives blocks back)
        assert_no_blocks_held(llm)
        # the prefix cache: a prompt run again reuses its full blocks
        params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
        for _ in range(2):
            again = llm.generate([{"prompt_token_ids": prompts[2]}], params, use_tqdm=False)
            assert again[0].outputs[0].token_ids == expected[2]
        if kind != "mistral":  # (its window let the blocks of old positions go)
            assert again[0].num_cached_tokens == 32  # 33 tokens: 8 full blocks of 4
        assert_no_blocks_held(llm)
    finally:
        llm.engine_core.shutdown()
    assert not any(w.is_running() for w in workers)
    assert torch.get_num_threads() == threads  # rank 0's share given back to this process


def test_int8_ngram_speculation_and_logprobs_match_one_rank(tiny_model_dirs) -> None:
    """Rank 0 samples from the gathered logits: logprobs, prompt logprobs and n-gram guesses
    (checked in one forward of both ranks) come out as one rank gives them."""
    path = str(tiny_model_dirs["qwen2"])
    repetitive = [p * 4 for p in random_prompts([6, 9, 12], seed=3)]
    params = SamplingParams(
        temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    results = {}
    for size in (1, 2):
        for quantization in (None, "int8"):
            llm = LLM(
                path,
                tensor_parallel_size=size,
                quantization=quantization,
                speculative_config=spec,
                kv_cache_memory_gb=0.01,
            )
            outputs = llm.generate(
                [{"prompt_token_ids": p} for p in repetitive], params, use_tqdm=False
            )
            results[size, quantization] = outputs
            if quantization is None:
                assert sum(llm.engine_core.scheduler.spec_accepted_per_pos) > 0
            llm.engine_core.shutdown()
    for a, b in zip(results[1, "int8"], results[2, "int8"], strict=True):
        assert_same_up_to_a_near_tie(a.outputs[0], b.outputs[0])
    for a, b in zip(results[1, None], results[2, None], strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert x.keys() == y.keys()
            for token in x:
                assert x[token].logprob == pytest.approx(y[token].logprob, abs=1e-4)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True):
            assert x.keys() == y.keys()
            for token in x:
                assert x[token].logprob == pytest.approx(y[token].logprob, abs=1e-4)


def test_adapters_split_across_ranks_match_peft(tiny_model_dirs, tmp_path) -> None:
    """LoRA on 2 ranks: each holds its slice of B (q/k/v, gate/up) or of A (o, down, whose
    partial deltas are all-reduced with the layer's); an adapter and the base mixed in one
    batch give PEFT's tokens, and over an int8 base what one rank gives (up to a near tie)."""
    from tests.lora.test_lora import ALL_TARGETS, make_adapter, peft_greedy

    base = tiny_model_dirs["qwen2"]
    adapter = make_adapter(base, tmp_path / "all", 1, 8, ALL_TARGETS)
    prompts = random_prompts([5, 23, 40, 11])
    lora = LoRARequest("all", 1, str(adapter))
    loras = [lora, None, lora, None]
    expected = peft_greedy(base, adapter, prompts)
    plain = peft_greedy(base, None, prompts)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    got = {}
    for size, quantization in ((2, None), (1, "int8"), (2, "int8")):
        llm = LLM(
            str(base), tensor_parallel_size=size, quantization=quantization, enable_lora=True,
            kv_cache_memory_gb=0.01,
        )  # fmt: skip
        try:
            got[size, quantization] = [
                o.outputs[0]
                for o in llm.generate(
                    [{"prompt_token_ids": p} for p in prompts],
                    params,
                    use_tqdm=False,
                    lora_request=loras,
                )
            ]
            assert_no_blocks_held(llm)
        finally:
            llm.engine_core.shutdown()
    assert [o.token_ids for o in got[2, None]] == [expected[0], plain[1], expected[2], plain[3]]
    for a, b in zip(got[1, "int8"], got[2, "int8"], strict=True):
        assert_same_up_to_a_near_tie(a, b)


def test_smollm2_on_three_ranks_matches_hf(smollm2_dir, hf_smollm2) -> None:
    """SmolLM2's 9 heads and 3 KV heads split three ways (one KV head each)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    expected = [hf_greedy(hf_smollm2, p, 12) for p in prompts]
    llm = LLM(
        str(smollm2_dir), tensor_parallel_size=3, dtype="float32", max_model_len=256,
        kv_cache_memory_gb=0.05,
    )  # fmt: skip
    try:
        assert run_greedy(llm, prompts, 12) == expected
    finally:
        llm.engine_core.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(enable_sleep_mode=True), "enable_sleep_mode does not work"),
        (dict(tensor_parallel_size=3), "does not divide the model's 4 attention heads"),
        (dict(quantization="int4"), "pass --quantization int8 or --dtype float32"),
        (dict(runner="pooling"), "runs with tensor_parallel_size=1"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be at least 1"),
    ],
)
def test_what_cannot_run_on_several_ranks_is_refused(tiny_model_dirs, kwargs, message) -> None:
    kwargs = {"tensor_parallel_size": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        create_engine_config(str(tiny_model_dirs["llama"]), **kwargs)


def test_a_worker_that_dies_takes_the_server_down_cleanly(tiny_chat_dir: Path) -> None:
    """`lmserve serve --tensor-parallel-size 2`: answers through the openai client; once a
    worker is killed, /health answers 503 within seconds, requests fail at once (no hang) and
    the core and the other ranks are gone (no orphans)."""
    import httpx
    import openai

    from tests.api.conftest import start_server, stop_server

    server = start_server(str(tiny_chat_dir), "--tensor-parallel-size", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="Hello", max_tokens=8)
        assert answer.usage.completion_tokens == 8
        # the core and the workers (not multiprocessing's resource tracker, the server's)
        descendants = [
            p
            for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())
        ]
        assert len(descendants) == 2
        workers = [p for p in descendants if "lmserve.executor.worker" in p.cmdline()]
        assert len(workers) == 1
        # killed in the middle of a stream: the stream ends (rank 0 stops waiting for it)
        stream = client.completions.create(
            model=model,
            prompt="Hello",
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        received = 0
        with pytest.raises(openai.APIError):
            for _ in stream:
                received += 1
                if received == 5:
                    workers[0].kill()
                    killed = time.monotonic()
        assert 5 <= received < 400
        assert time.monotonic() - killed < 5
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200"
            time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as failed:
            client.completions.create(model=model, prompt="Hello", max_tokens=8)
        assert failed.value.status_code == 503
        assert time.monotonic() - start < 5
        deadline = time.monotonic() + 10
        while alive := [p.pid for p in descendants if _running(p)]:
            assert time.monotonic() < deadline, f"still running: {alive}"
            time.sleep(0.2)
    finally:
        stop_server(server)


def _running(process: psutil.Process) -> bool:
    """Running, not exited (a zombie has exited; its parent has yet to collect it)."""
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_data_parallel_cores_each_with_tensor_parallel_ranks(tiny_model_dirs) -> None:
    """--data-parallel-size 2 --tensor-parallel-size 2: two cores, each rank 0 of its own two
    ranks; concurrent requests give one rank's tokens, whichever core runs them."""
    import asyncio

    from lmserve.engine.async_engine import AsyncEngine

    path = str(tiny_model_dirs["llama"])
    prompts = random_prompts([5, 17, 33, 9, 12, 3, 21, 8], seed=4)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)

    async def run() -> tuple[list[list[int]], int]:
        engine = await AsyncEngine.start(
            path, data_parallel_size=2, tensor_parallel_size=2, kv_cache_memory_gb=0.02,
            log_stats=False,
        )  # fmt: skip
        try:
            workers = [
                p
                for p in psutil.Process().children(recursive=True)
                if "lmserve.executor.worker" in p.cmdline()
            ]

            async def one(i: int) -> list[int]:
                async for out in engine.generate({"prompt_token_ids": prompts[i]}, params, f"r{i}"):
                    last = out
                return last.outputs[0].token_ids

            return await asyncio.gather(*(one(i) for i in range(len(prompts)))), len(workers)
        finally:
            await engine.shutdown()

    tokens, num_workers = asyncio.run(run())
    assert num_workers == 2  # one per core
    llm = LLM(path, kv_cache_memory_gb=0.02)
    assert tokens == run_greedy(llm, prompts)
