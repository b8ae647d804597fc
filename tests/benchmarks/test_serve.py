"""`lmserve bench serve` against a real lmserve server on loopback."""

from __future__ import annotations

import json

import pytest

from lmserve.benchmarks.serve import run
from tests.api.conftest import start_server, stop_server


@pytest.fixture(scope="module")
def server_url(smollm2_dir):
    server = start_server("--max-model-len", "512", "--kv-cache-memory-gb", "0.1")
    yield server.url
    stop_server(server)


def test_reports_latencies_and_throughput(server_url: str, capsys: pytest.CaptureFixture) -> None:
    result = run(
        [
            "--base-url",
            server_url,
            "--num-prompts",
            "4",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--max-concurrency",
            "2",
            "--request-rate",
            "20",
        ]
    )
    assert json.loads(capsys.readouterr().out.strip()) == result
    assert (result["completed"], result["failed"]) == (4, 0)
    assert result["output_tok_per_s"] > 0 and result["requests_per_s"] > 0
    assert 0 < result["ttft_ms"]["p50"] <= result["e2e_ms"]["p50"]
    assert result["itl_ms"]["mean"] > 0 and result["tpot_ms"]["mean"] > 0
    assert result["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_failures_are_counted_not_fatal(server_url: str) -> None:
    result = run(
        ["--base-url", server_url, "--num-prompts", "2", "--input-len", "600", "--output-len", "4"]
    )  # longer than --max-model-len: every request is a 400
    assert (result["completed"], result["failed"]) == (0, 2)
    assert "HTTP 400" in result["first_error"]
