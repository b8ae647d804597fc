"""The throughput benchmark on a tiny random Llama with no tokenizer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lmserve.benchmarks.throughput import _bytes_per_weight, add_arguments, main
from lmserve.engine.args import create_engine_config

FIELDS = {
    "engine", "model", "num_prompts", "input_len", "output_len", "elapsed_s", "requests_per_s",
    "output_tok_per_s", "total_tok_per_s", "peak_rss_mb", "torch_threads", "device",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


def _run(model: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", str(model), "--num-prompts", "3", "--input-len", "8", "--output-len", "4"]
    return main(parser.parse_args([*argv, "--kv-cache-memory-gb", "0.01", *extra]))


def _json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]


def test_lmserve_only(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _run(tiny_model)
    (line,) = _json_lines(capsys)
    assert line == results["lmserve"]
    assert line.keys() >= FIELDS
    assert line["engine"] == "lmserve" and line["device"] == "cpu"
    assert (line["num_prompts"], line["input_len"], line["output_len"]) == (3, 8, 4)
    assert line["num_output_tokens"] == 3 * 4 and line["num_prompt_tokens"] == 3 * 8
    assert line["elapsed_s"] > 0 and line["output_tok_per_s"] > 0 and line["peak_rss_mb"] > 0
    roofline = line["roofline"]
    assert roofline["bandwidth_gb_s"] > 0 and roofline["peak_tops"] > 0
    assert roofline["output_tok_per_s"] == pytest.approx(12 / roofline["seconds"], rel=1e-2)
    assert roofline["fraction"] == pytest.approx(
        line["output_tok_per_s"] / roofline["output_tok_per_s"], rel=1e-2
    )


def test_hf_peer(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = _run(tiny_model, "--peer", "hf", "--peer-batch-size", "2")
    lmserve, hf, ratio = _json_lines(capsys)
    assert hf.keys() >= FIELDS and hf == results["hf"] and hf["engine"] == "hf"
    assert lmserve["num_output_tokens"] == hf["num_output_tokens"] == 3 * 4
    assert ratio["ratio_output_tok_per_s"] == results["ratio_output_tok_per_s"] > 0


def test_dataset_of_token_ids(tiny_model: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "prompts.jsonl"
    rows = [{"prompt_token_ids": [101, 102, 103]}, {"prompt_token_ids": [201] * 5, "output_len": 6}]
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = _run(tiny_model, "--dataset", str(dataset), "--peer", "hf")
    for engine in ("lmserve", "hf"):
        line = results[engine]
        assert line["num_prompts"] == 2
        assert line["num_prompt_tokens"] == 3 + 5
        assert line["num_output_tokens"] == 4 + 6


def test_images_per_prompt_with_hf_peer(
    tiny_llava_dir: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--images 2: each prompt carries two random images' rows ahead of its text; both engines
    generate every token, and the image encoder's own time is reported apart."""
    results = _run(tiny_llava_dir, "--images", "2", "--image-size", "40", "--peer", "hf")
    for engine in ("lmserve", "hf"):
        line = results[engine]
        assert line["num_output_tokens"] == 3 * 4
        assert line["input_len"] == 8 + 2 * 16  # 16 rows per 28-pixel image
        assert (line["images_per_prompt"], line["image_size"]) == (2, 40)
    assert results["lmserve"]["image_encoder_s"] > 0 and "roofline" not in results["lmserve"]
    with pytest.raises(ValueError, match="needs a vision-language model"):
        _run(tiny_model, "--images", "1")


def test_qwen2_5_vl_images_with_hf_peer(tiny_qwen2_5_vl_dir: Path) -> None:
    """A 56-pixel image is a 4x4 patch grid: 4 merged rows between vision start and end."""
    results = _run(tiny_qwen2_5_vl_dir, "--images", "1", "--image-size", "56", "--peer", "hf")
    for engine in ("lmserve", "hf"):
        assert results[engine]["num_output_tokens"] == 3 * 4
        assert results[engine]["input_len"] == 8 + 1 + 4 + 1
    assert results["lmserve"]["image_encoder_s"] > 0


def test_the_roofline_counts_the_bytes_a_step_reads_per_weight(smollm2_dir: Path) -> None:
    """float32 4 bytes, int8 1, int4 Q4_1's 20 per 32; SmolLM2's GGUF blocks as stored:
    Q4_1 layers (0.625) and its Q8_0 embedding, which is also the head (1.0625)."""
    sizes = {}
    for quantization in (None, "int8", "int4", "gguf"):
        model = create_engine_config(
            str(smollm2_dir), quantization=quantization, dtype="float32", kv_cache_memory_gb=0.01
        ).model
        sizes[quantization] = _bytes_per_weight(model, 4)
    assert (sizes[None], sizes["int8"], sizes["int4"]) == (4.0, 1.0, 0.625)
    assert 0.625 < sizes["gguf"] < 1.0625
