"""Engine arguments under vLLM's names and meanings."""

from __future__ import annotations

import argparse

import pytest

from lmserve.engine.args import create_engine_config
from lmserve.engine.cli_args import add_engine_cli_args, engine_kwargs_from_cli


def test_without_chunked_prefill_a_step_holds_a_whole_prompt(tiny_chat_dir) -> None:
    chunked = create_engine_config(str(tiny_chat_dir), max_num_batched_tokens=64)
    assert chunked.scheduler.max_num_batched_tokens == 64
    whole = create_engine_config(
        str(tiny_chat_dir), max_num_batched_tokens=64, enable_chunked_prefill=False
    )
    assert whole.scheduler.max_num_batched_tokens == whole.scheduler.max_model_len == 512


def test_vllms_flag_spellings_parse(tiny_chat_dir) -> None:
    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    args = parser.parse_args(
        ["--no-enable-chunked-prefill", "--structured-outputs-config.backend", "guidance",
         "--metrics-prefix", "vllm", "--show-hidden-metrics-for-version", "0.10"]
    )  # fmt: skip
    kwargs = engine_kwargs_from_cli(args)
    assert kwargs["enable_chunked_prefill"] is False
    assert kwargs["structured_outputs_backend"] == "guidance"
    config = create_engine_config(str(tiny_chat_dir), **kwargs)
    assert config.observability.metrics_prefix == "vllm"
    with pytest.raises(ValueError, match="metrics_prefix"):
        create_engine_config(str(tiny_chat_dir), metrics_prefix="prom")


def test_hf_overrides_replace_config_keys(tiny_chat_dir) -> None:
    """vLLM's --hf-overrides: the model is built from the overridden config."""
    from lmserve import LLM

    parser = argparse.ArgumentParser()
    add_engine_cli_args(parser)
    args = parser.parse_args(["--hf-overrides", '{"num_hidden_layers": 1, "sliding_window": 8}'])
    kwargs = engine_kwargs_from_cli(args)
    config = create_engine_config(str(tiny_chat_dir), **kwargs)
    assert config.model.hf_config["num_hidden_layers"] == 1
    llm = LLM(str(tiny_chat_dir), hf_overrides={"num_hidden_layers": 1}, load_format="dummy")
    assert len(llm.engine_core.runner.model.model.layers) == 1
    with pytest.raises(ValueError, match="hf_overrides is not JSON"):
        create_engine_config(str(tiny_chat_dir), hf_overrides="{num_hidden_layers: 1}")
    with pytest.raises(ValueError, match="hf_overrides is a JSON object"):
        create_engine_config(str(tiny_chat_dir), hf_overrides="[1]")


def test_hf_overrides_fewer_layers_keep_the_first_layer_kinds(tmp_path) -> None:
    """Overriding `num_hidden_layers` of a model whose config lists `layer_types` (gpt-oss,
    Gemma 3) builds that many layers, windowed and global as the model's first layers are."""
    import torch

    from lmserve.benchmarks.shapes import resolve_model
    from lmserve.models.registry import resolve_model_class

    shape = resolve_model("gpt-oss-20b", tmp_path)
    config = create_engine_config(shape, load_format="dummy", hf_overrides={"num_hidden_layers": 3})
    assert config.model.hf_config["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
    ]
    with torch.device("meta"):
        model = resolve_model_class(config.model.architecture)(config.model.hf_config)
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [128, None, 128]
