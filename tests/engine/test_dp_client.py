"""Data parallel (--data-parallel-size): how requests are routed among the cores, then two
cores behind one real server on a tiny model: load spread over both, a shared prompt start
kept on one core's prefix cache, and one core killed while the other goes on serving."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import psutil
import pytest

from lmserve.engine.args import create_engine_config
from lmserve.engine.dp_client import DataParallelCoreClient
from lmserve.engine.messages import EngineCoreRequest
from lmserve.sampling_params import SamplingParams
from tests.api.conftest import Server, start_server, stop_server
from tests.engine.test_llm import random_prompts


def request(req_id: str, tokens: list[int], cache_salt: str | None = None) -> EngineCoreRequest:
    return EngineCoreRequest(
        req_id, tokens, SamplingParams(max_tokens=4), None, 0.0, cache_salt=cache_salt
    )


@pytest.fixture
def router(tiny_model_dirs) -> DataParallelCoreClient:
    """Routing alone: two cores taken as live, none started."""
    config = create_engine_config(str(tiny_model_dirs["llama"]), data_parallel_size=2)
    client = DataParallelCoreClient(config)
    client._alive = [True, True]
    return client


def test_requests_go_to_the_least_busy_core_in_turn(router) -> None:
    prompts = random_prompts([40] * 8, seed=1)
    ranks = [router.route(request(f"r{i}", p)) for i, p in enumerate(prompts)]
    assert sorted(ranks) == [0, 0, 0, 0, 1, 1, 1, 1]
    router._forget("r0")  # finished: its core is the less busy one now
    assert router.route(request("next", random_prompts([40], seed=2)[0])) == ranks[0]


def test_a_shared_prompt_start_stays_on_its_core_until_that_core_is_much_busier(router) -> None:
    start = random_prompts([64], seed=3)[0]
    others = random_prompts([40] * 20, seed=4)
    first = router.route(request("a", start + [1, 2, 3]))
    router.route(request("b", others[0]))  # the other core is as busy now
    assert router.route(request("c", start + [4, 5])) == first
    assert router.route(request("d", start[:32] + [6] * 20)) == first  # a shorter shared start
    # a salted or adapter's request shares no cache with it
    assert router.route(request("e", start + [7], cache_salt="user-2")) != first
    other = 1 - first
    for i in range(30):  # the holder fills up; the next goes elsewhere only once it is busy
        if router.route(request(f"f{i}", start + [8 + i])) == other:
            break
    else:
        pytest.fail("a shared start never left its overloaded core")
    held, was = router._load[first], router._load[other] - 1  # as they were when it left
    assert held > max(2 * was, was + 8)
    assert router.route(request("g", start + [99])) == other  # that core holds it now too


def test_a_dead_core_takes_no_requests(router) -> None:
    router._alive = [False, True]
    assert {router.route(request(f"r{i}", [1] * 20)) for i in range(5)} == {1}


# ---- two cores behind a real server ----------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model_dirs) -> Iterator[Server]:
    server = start_server(
        str(tiny_model_dirs["llama"]), "--data-parallel-size", "2", "--served-model-name",
        "tiny", "--kv-cache-memory-gb", "0.05", "--block-size", "16",
    )  # fmt: skip
    yield server
    stop_server(server)


def series(server: Server, name: str) -> dict[str, float]:
    """A series' value per engine label (summed over its other labels)."""
    return parse_series(httpx.get(f"{server.url}/metrics").text, name)


def parse_series(text: str, name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for match in re.finditer(rf"^lmserve:{name}{{([^}}]*)}} (\S+)$", text, re.MULTILINE):
        engine = re.search(r'engine="(\d+)"', match.group(1)).group(1)
        found[engine] = found.get(engine, 0.0) + float(match.group(2))
    return found


def core_processes(server: Server) -> list[psutil.Process]:
    """The engine cores: the server's spawned children, not multiprocessing's tracker."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return [
        p
        for p in children
        if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())
    ]


def complete(client: openai.AsyncOpenAI, prompt: list[int], max_tokens: int = 8):
    return client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def test_64_concurrent_requests_are_split_across_both_cores(server: Server) -> None:
    before = series(server, "request_success_total")

    async def burst() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none")
        prompts = random_prompts([8, 20, 33, 47] * 16, seed=5)
        return await asyncio.gather(*(complete(client, p) for p in prompts))

    replies = asyncio.run(burst())
    assert all(r.usage.completion_tokens == 8 for r in replies)
    after = series(server, "request_success_total")
    done = {e: after.get(e, 0) - before.get(e, 0) for e in ("0", "1")}
    assert sum(done.values()) == 64
    assert min(done.values()) >= 24, done  # both cores served a fair share


def test_requests_sharing_a_prompt_start_hit_one_cores_cache(server: Server) -> None:
    start = random_prompts([200], seed=6)[0]
    tails = random_prompts([5] * 6, seed=7)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    before = series(server, "prefix_cache_hits_total")
    for tail in tails:
        client.completions.create(model="tiny", prompt=start + tail, max_tokens=2)
    after = series(server, "prefix_cache_hits_total")
    rise = {e: after.get(e, 0) - before.get(e, 0) for e in ("0", "1")}
    assert sorted(rise.values()) == [0, 5 * 192], rise  # 12 full blocks hit, five times, on one


LONG = 480  # tokens: prompt and output within the tiny model's 512 positions


def test_a_killed_core_fails_its_own_requests_and_the_other_serves(server: Server) -> None:
    cores = core_processes(server)
    assert len(cores) == 2

    async def long_requests() -> list:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        prompts = random_prompts([10] * 16, seed=8)
        tasks = [asyncio.create_task(complete(client, p, LONG)) for p in prompts]
        # until both cores are running some (polled without blocking the requests' loop: the
        # tiny model decodes them in well under a second)
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as http:
            while True:
                text = (await http.get(f"{server.url}/metrics")).text
                if min(parse_series(text, "num_requests_running").get(e, 0) for e in "01") >= 1:
                    break
                assert time.monotonic() < deadline, "the two cores never ran requests at once"
                await asyncio.sleep(0.005)
        os.kill(cores[1].pid, signal.SIGKILL)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(long_requests())
    failed = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert 1 <= len(failed) < len(results)  # the killed core's, and only those
    assert all(r.usage.completion_tokens == LONG for r in results if not isinstance(r, Exception))
    assert httpx.get(f"{server.url}/health").status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    for prompt in random_prompts([12] * 8, seed=9):  # every new request goes to the live core
        assert client.completions.create(model="tiny", prompt=prompt, max_tokens=3).choices
    deadline = time.monotonic() + 10
    while series(server, "num_requests_running").get("1", 0) != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "engine core 1 died" in server.log()
    survivor = cores[0]
    stop_server(server)
    survivor.wait(timeout=30)  # the other core exits with the server: no orphan


def test_size_is_checked_and_the_offline_llm_refuses_it(tiny_model_dirs) -> None:
    from lmserve import LLM

    path = str(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="at least 1"):
        create_engine_config(path, data_parallel_size=0)
    with pytest.raises(ValueError, match="lmserve serve"):
        LLM(path, data_parallel_size=2, kv_cache_memory_gb=0.01)
