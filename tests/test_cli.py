"""The `lmserve` command as a user runs it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("flags", [[], ["--quantization", "int8"]], ids=["fp32", "int8"])
def test_chat_answers_in_the_terminal(smollm2_dir, flags: list[str]) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmserve.cli",
            "chat",
            *flags,
            "--temperature",
            "0",
            "--max-tokens",
            "32",
            "--max-model-len",
            "2048",
            "--kv-cache-memory-gb",
            "0.25",
        ],
        input="What is the capital of France?\n/reset\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bench_throughput_prints_json(tiny_model_dirs) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmserve.cli",
            "bench",
            "throughput",
            "--model",
            str(tiny_model_dirs["llama"]),
            "--num-prompts",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--kv-cache-memory-gb",
            "0.01",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["engine"] == "lmserve" and line["num_output_tokens"] == 12


def test_bad_model_is_a_clear_error(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lmserve.cli", "chat", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "lmserve does not download models" in result.stderr
