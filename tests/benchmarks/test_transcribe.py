"""The transcription benchmark on the bundled Whisper tiny.en, beside HF and faster-whisper."""

from __future__ import annotations

import argparse
import json

import pytest

from lmserve.benchmarks.transcribe import add_arguments, main


def test_beside_hf_and_faster_whisper(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = ["--num-files", "2", "--repeats", "1", "--peer", "hf", "faster-whisper"]
    results = main(parser.parse_args(args))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    ours, hf, int8, fp32, summary = lines
    assert ours == results["lmserve"] and hf == results["hf"]
    assert [r["engine"] for r in (ours, hf, int8, fp32)] == [
        "lmserve", "hf", "faster-whisper-int8", "faster-whisper-float32"
    ]  # fmt: skip
    # beckett.wav and two_cities.wav: three windows, 54 s of audio
    assert ours["num_windows"] == hf["num_windows"] == 3 and 54 < ours["audio_s"] < 55
    assert hf["same_texts"] == 3 and ours["output_tokens"] == hf["output_tokens"]
    assert all(r["audio_s_per_s"] > 0 for r in (ours, hf, int8, fp32))
    assert set(summary) == {
        "ratio_vs_hf", "ratio_vs_faster-whisper-int8", "ratio_vs_faster-whisper-float32"
    }  # fmt: skip
