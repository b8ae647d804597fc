"""`lmserve bench soak`, briefly, against a real server: every kind of request succeeds and each
process's anonymous memory is sampled."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from lmserve.benchmarks import soak
from tests.api.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def server(tiny_chat_dir):
    server = start_server(
        str(tiny_chat_dir), "--kv-cache-memory-gb", "0.05", "--max-model-len", "256",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip
    yield server
    stop_server(server)


def test_mixed_traffic_runs_without_errors_and_memory_is_sampled(server: Server, capsys) -> None:
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args(
        ["--base-url", server.url, "--server-pid", str(server.proc.pid), "--duration-s", "4",
         "--warmup-s", "1", "--concurrency", "2", "--sample-s", "0.5", "--max-tokens", "8"]
    )  # fmt: skip
    result = soak.main(args)
    assert json.loads(capsys.readouterr().out.strip()) == result
    assert result["errors"] == {}, result["error_samples"]
    assert set(result["requests"]) == set(soak.KINDS)
    memory = result["memory_mib"]
    assert "api" in memory and len(memory) >= 2  # the server and its engine core
    for process in memory.values():
        assert 0 < process["after_warmup"] <= process["peak"]


def test_anonymous_memory_is_read_from_proc() -> None:
    own = soak.anon_kib(os.getpid())
    assert own is not None and own > 0
    assert soak.anon_kib(2**22 + 7) is None  # no such process
    assert os.getpid() in soak.descendants(os.getppid())
