"""`lmserve bench overload` against a real server whose queue is bounded."""

from __future__ import annotations

import argparse
import json

import pytest

from lmserve.benchmarks import overload
from tests.api.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def server_url(tiny_chat_dir):
    server = start_server(
        str(tiny_chat_dir), "--kv-cache-memory-gb", "0.05", "--max-model-len", "256",
        "--max-num-seqs", "1", "--max-num-queued-reqs", "2",
    )  # fmt: skip
    yield server.url
    stop_server(server)


def test_a_burst_is_answered_with_200s_and_503s(server_url: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    overload.add_arguments(parser)
    args = parser.parse_args(
        ["--base-url", server_url, "--num-requests", "20", "--max-tokens", "64"]
    )
    result = overload.main(args)
    assert json.loads(capsys.readouterr().out.strip()) == result
    statuses = result["statuses"]
    assert set(statuses) == {"200", "503"} and sum(statuses.values()) == 20
    assert result["503_with_retry_after"] == statuses["503"]
    assert result["timeouts"] == 0
    assert result["after"]["status"] == "200"
    assert result["latency_503"]["max_s"] <= result["wall_s"]
