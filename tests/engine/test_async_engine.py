"""AsyncEngine over a real engine-core process: concurrent streams, aborts, a dying core."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from lmserve import LLM, SamplingParams
from lmserve.engine.async_engine import AsyncEngine, EngineDeadError
from tests.engine.test_llm import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


async def start(path) -> AsyncEngine:
    return await AsyncEngine.start(str(path), kv_cache_memory_gb=0.01, start_timeout_s=120)


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams, rid: str):
    snapshots = [out async for out in engine.generate({"prompt_token_ids": prompt}, params, rid)]
    return snapshots


def test_concurrent_streams_match_offline(tiny_model_dirs) -> None:
    prompts = random_prompts([5, 17, 33, 9], seed=11)
    offline = LLM(str(tiny_model_dirs["qwen2"]), kv_cache_memory_gb=0.01)
    expected = [
        o.outputs[0].token_ids
        for o in offline.generate(
            [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False
        )
    ]

    async def run():
        engine = await start(tiny_model_dirs["qwen2"])
        try:
            results = await asyncio.gather(
                *(collect(engine, p, GREEDY, f"r{i}") for i, p in enumerate(prompts))
            )
            stats = await engine.get_stats()
        finally:
            await engine.shutdown()
        return results, stats

    results, stats = asyncio.run(run())
    for snapshots, want in zip(results, expected, strict=True):
        lengths = [len(s.outputs[0].token_ids) for s in snapshots]
        assert lengths == sorted(lengths) and len(snapshots) > 1  # streamed, growing
        assert [s.finished for s in snapshots] == [False] * (len(snapshots) - 1) + [True]
        assert snapshots[-1].outputs[0].token_ids == want
    assert stats.num_free_blocks == stats.num_usable_blocks
    assert stats.num_running == stats.num_waiting == 0


def test_abandoned_stream_frees_its_blocks(tiny_model_dirs) -> None:
    long_run = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def run():
        engine = await start(tiny_model_dirs["llama"])
        try:
            stream = engine.generate({"prompt_token_ids": random_prompts([40])[0]}, long_run, "x")
            seen = 0
            async for _ in stream:
                seen += 1
                if seen == 3:
                    break
            await stream.aclose()  # what a web server does when the client disconnects
            busy = await engine.get_stats()
            for _ in range(50):
                stats = await engine.get_stats()
                if stats.num_running == 0:
                    break
                await asyncio.sleep(0.05)
            after = await collect(engine, [1, 2, 3], GREEDY, "y")
        finally:
            await engine.shutdown()
        return busy, stats, after

    busy, stats, after = asyncio.run(run())
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_usable_blocks
    assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 12


def test_bad_input_is_rejected_before_queueing(tiny_model_dirs) -> None:
    async def run():
        engine = await start(tiny_model_dirs["llama"])
        try:
            with pytest.raises(ValueError, match="longer than the maximum model length"):
                await collect(engine, [1] * 600, GREEDY, "too-long")
            whole_vocab = SamplingParams(temperature=0, max_tokens=1, logprobs=-1)
            with pytest.raises(ValueError, match=r"--max-logprobs.*whole vocabulary"):
                await collect(engine, [1, 2], whole_vocab, "vocab")  # past the default 20
            unknown = SamplingParams(max_tokens=1, logprobs=0, logprob_token_ids=[10**9])
            with pytest.raises(ValueError, match="vocab"):
                await collect(engine, [1, 2], unknown, "unknown-id")
            return await collect(engine, [1, 2], GREEDY, "fine")
        finally:
            await engine.shutdown()

    assert asyncio.run(run())[-1].finished


def test_dead_core_fails_requests_instead_of_hanging(tiny_model_dirs) -> None:
    endless = SamplingParams(temperature=0, max_tokens=100000, ignore_eos=True)

    async def run():
        engine = await start(tiny_model_dirs["llama"])
        try:
            stream = engine.generate({"prompt_token_ids": [1, 2, 3]}, endless, "doomed")
            await stream.__anext__()
            os.kill(engine.client._proc.pid, signal.SIGKILL)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert not engine.is_healthy
            with pytest.raises(EngineDeadError):
                await collect(engine, [1], GREEDY, "after")
        finally:
            await engine.shutdown()

    asyncio.run(asyncio.wait_for(run(), timeout=120))


def test_streamed_text_never_takes_back_a_stop_string(smollm2_llm) -> None:
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    full = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    text = full[0].outputs[0].text
    stop = text[text.index(" ", 20) : text.index(" ", 20) + 4]  # spans a token boundary or not
    prompt = smollm2_llm.get_tokenizer().apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )

    async def run():
        engine = await AsyncEngine.start(
            None, max_model_len=2048, kv_cache_memory_gb=0.25, start_timeout_s=300
        )
        try:
            params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
            return [
                o
                async for o in engine.generate(
                    {
                        "prompt_token_ids": smollm2_llm.get_tokenizer().encode(
                            prompt, add_special_tokens=False
                        )
                    },
                    params,
                )
            ]
        finally:
            await engine.shutdown()

    snapshots = asyncio.run(run())
    final = snapshots[-1].outputs[0]
    assert final.text == text[: text.index(stop)] and final.stop_reason == stop
    assert all(final.text.startswith(s.outputs[0].text) for s in snapshots)


def test_shutdown_ends_requests_in_flight(tiny_model_dirs) -> None:
    """A replica shutting down mid-request: the stream ends with EngineDeadError at once."""
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def run() -> tuple[int, BaseException | None]:
        engine = await start(tiny_model_dirs["llama"])
        received = 0
        error: BaseException | None = None

        async def consume() -> None:
            nonlocal received, error
            try:
                async for _ in engine.generate({"prompt_token_ids": [1, 2, 3]}, long, "r"):
                    received += 1
            except EngineDeadError as exc:
                error = exc

        task = asyncio.create_task(consume())
        while received < 3:
            await asyncio.sleep(0.01)
        await engine.shutdown()
        await asyncio.wait_for(task, timeout=10)
        return received, error

    received, error = asyncio.run(run())
    assert 3 <= received < 400 and isinstance(error, EngineDeadError)


def test_a_core_that_does_not_load_in_time_is_stopped(tiny_model_dirs) -> None:
    import multiprocessing

    before = {p.pid for p in multiprocessing.active_children()}

    async def run() -> None:
        with pytest.raises(TimeoutError, match="did not finish loading within 0.001 s"):
            await AsyncEngine.start(
                str(tiny_model_dirs["llama"]), kv_cache_memory_gb=0.01, start_timeout_s=0.001
            )

    asyncio.run(run())
    assert {p.pid for p in multiprocessing.active_children()} <= before  # no core left behind
