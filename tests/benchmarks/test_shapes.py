"""Shipped benchmark shapes: served from a cached copy with a placeholder tokenizer, so a dummy
model of a large model's real shape serves text end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmserve.benchmarks.serve import run as bench_serve
from lmserve.benchmarks.shapes import SHAPES_DIR, resolve_model, with_placeholder_tokenizer
from lmserve.engine.tokenizer import load_tokenizer
from tests.api.conftest import start_server, stop_server


def test_placeholder_tokenizer_round_trips_the_whole_vocabulary(tiny_model_dirs, tmp_path) -> None:
    config = json.loads((tiny_model_dirs["qwen2"] / "config.json").read_text())
    served = with_placeholder_tokenizer(tiny_model_dirs["qwen2"], tmp_path / "qwen2")
    tokenizer = load_tokenizer(served)
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token_id == config["eos_token_id"]
    ids = random.Random(0).choices(range(1, config["vocab_size"]), k=200)
    text = tokenizer.decode(ids)
    assert len(text.split()) == len(ids)
    assert tokenizer.encode(text, add_special_tokens=False) == ids
    assert json.loads((served / "config.json").read_text()) == config


def test_a_shape_is_written_once_and_refreshed_when_its_config_changes(tmp_path) -> None:
    served = Path(resolve_model("qwen2.5-0.5B", tmp_path))
    assert served == tmp_path / "shapes" / "Qwen2.5-0.5B"
    tokenizer_file = served / "tokenizer.json"
    written = tokenizer_file.stat().st_mtime_ns
    assert resolve_model("Qwen2.5-0.5B", tmp_path) == str(served)
    assert tokenizer_file.stat().st_mtime_ns == written
    (served / "config.json").write_text("{}")  # a copy left by an older shipped config
    resolve_model("Qwen2.5-0.5B", tmp_path)
    shipped = (SHAPES_DIR / "Qwen2.5-0.5B" / "config.json").read_text()
    assert (served / "config.json").read_text() == shipped
    assert resolve_model("not-a-shape", tmp_path) == "not-a-shape"


def test_a_dummy_shape_serves_the_serving_benchmark() -> None:
    """`lmserve serve Qwen2.5-0.5B --load-format dummy`, measured by `lmserve bench serve` with
    the shape's tokenizer: every request completes with its full output length."""
    server = start_server(
        "Qwen2.5-0.5B", "--load-format", "dummy", "--max-model-len", "256",
        "--kv-cache-memory-gb", "0.05",
    )  # fmt: skip
    try:
        result = bench_serve(
            ["--base-url", server.url, "--tokenizer", "Qwen2.5-0.5B", "--num-prompts", "3",
             "--input-len", "24", "--output-len", "6", "--max-concurrency", "3"]
        )  # fmt: skip
    finally:
        stop_server(server)
    assert (result["completed"], result["failed"]) == (3, 0), result.get("first_error")
    assert result["model"] == "Qwen2.5-0.5B"
    assert result["total_output_tokens"] == 3 * 6
    assert result["itl_ms"]["mean"] > 0 and result["ttft_ms"]["p50"] > 0


def test_vision_shapes_ship_their_image_processor(tmp_path) -> None:
    """A vision-language shape is served with its image processor's config beside it, and its
    placeholder tokenizer covers the text model's vocabulary."""
    for name in ("LLaVA-1.5-7B", "LLaVA-CLIP-B16-SmolLM2-135M", "Qwen2.5-VL-3B"):
        served = Path(resolve_model(name, tmp_path))
        config = json.loads((served / "config.json").read_text())
        assert (served / "preprocessor_config.json").exists()
        assert len(load_tokenizer(served)) == config["text_config"]["vocab_size"]


@pytest.mark.parametrize(
    ("shape", "billions"),
    [
        ("Llama-3-8B", 8.03),
        ("Qwen2.5-0.5B", 0.494),
        ("Qwen3-30B-A3B", 30.5),
        ("Gemma-3-4B", 3.88),
        ("gpt-oss-20b", 20.9),
    ],
)
def test_text_shapes_build_at_their_published_size(shape: str, billions: float) -> None:
    """Each shipped config builds (on the meta device: no memory) to the parameter count its
    model card states, so `--load-format dummy` runs time the real model's work."""
    import torch

    from lmserve.models.registry import resolve_model_class

    config = json.loads((SHAPES_DIR / shape / "config.json").read_text())
    with torch.device("meta"):
        model = resolve_model_class(config["architectures"][0])(config)
    tied = model.tie_word_embeddings  # the LM head is then a copy of the embedding
    count = sum(
        p.numel() for name, p in model.named_parameters() if not (tied and name == "lm_head.weight")
    )
    assert count / 1e9 == pytest.approx(billions, rel=0.005)
