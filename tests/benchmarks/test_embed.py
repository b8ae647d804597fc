"""The embedding benchmark on the bundled all-MiniLM-L6-v2, beside sentence-transformers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmserve.benchmarks.embed import add_arguments, main


def test_beside_sentence_transformers(minilm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--model", str(minilm_dir), "--num-sentences", "12", "--latency-runs", "3"]
    results = main(parser.parse_args([*args, "--max-words", "300", "--peer", "st"]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    ours, theirs, summary = lines
    assert ours == results["lmserve"]["report"] and theirs == results["st"]["report"]
    assert ours["engine"] == "lmserve" and theirs["engine"] == "sentence-transformers"
    assert ours["num_sentences"] == theirs["num_sentences"] == 12
    assert ours["sentences_per_s"] > 0 and ours["single_p50_ms"] > 0
    # the same sentences (some past the 256-token limit, so truncated alike) embedded the same
    assert summary["max_abs_diff"] < 1e-5 and summary["min_cosine"] > 0.99999
    assert results["lmserve"]["vectors"].shape == (12, 384)
