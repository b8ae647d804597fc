"""`lmserve bench serve` against a real lmserve server on loopback."""

from __future__ import annotations

import json

import pytest

from lmserve.benchmarks.serve import _LLAMA_SERVER, run
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


def test_code_edit_prompts_repeat_their_function(capsys: pytest.CaptureFixture) -> None:
    """The code-edit set: chat-formatted requests to rewrite a function, each different."""
    import argparse

    from lmserve.benchmarks.serve import _prompts

    args = argparse.Namespace(
        dataset=None, dataset_name="code-edit", tokenizer=None, seed=0, num_prompts=3
    )
    prompts = _prompts(args)
    assert len(set(prompts)) == 3
    assert all("<|im_start|>assistant" in p and "def " in p and "return" in p for p in prompts)


@pytest.mark.skipif(
    not _LLAMA_SERVER.exists(), reason=f"llama.cpp's llama-server is not built at {_LLAMA_SERVER}"
)
def test_llama_server_peer_on_the_same_gguf(server_url: str) -> None:
    """Both servers get the same requests, every one of them answered (no dropped keep-alive
    connection), and the ratios compare them."""
    result = run(
        ["--base-url", server_url, "--num-prompts", "8", "--input-len", "16", "--output-len",
         "8", "--max-concurrency", "1", "--peer", "llama-server"]
    )  # fmt: skip
    for name in ("lmserve", "llama-server"):
        assert (result[name]["completed"], result[name]["failed"]) == (8, 0), result[name]
    assert result["llama-server"]["model"].endswith(".gguf")
    expected = result["lmserve"]["output_tok_per_s"] / result["llama-server"]["output_tok_per_s"]
    assert result["output_tok_per_s_ratio"] == pytest.approx(expected, rel=1e-2)
