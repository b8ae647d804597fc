"""LLMConfig / LLMServingArgs: Ray Serve LLM's shapes, checked without starting Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lmserve.serve.config import LLMConfig, LLMServingArgs


def test_model_source_defaults_to_model_id() -> None:
    config = LLMConfig(model_loading_config={"model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    assert config.model_source == config.model_id
    other = LLMConfig(model_loading_config={"model_id": "a", "model_source": "/m"})
    assert (other.model_id, other.model_source) == ("a", "/m")


def test_unknown_engine_kwargs_and_fields_are_named() -> None:
    with pytest.raises(ValidationError, match="max_num_seq") as info:
        LLMConfig(model_loading_config={"model_id": "a"}, engine_kwargs={"max_num_seq": 4})
    assert "max_num_seqs" in str(info.value)  # the known names are listed
    with pytest.raises(ValidationError, match="accelerator"):
        LLMConfig(model_loading_config={"model_id": "a"}, accelerator="A10G")


def test_serving_args_take_configs_dicts_and_files(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"model_loading_config": {"model_id": "b"}}))
    args = LLMServingArgs(
        llm_configs=[
            LLMConfig(model_loading_config={"model_id": "a"}),
            {"model_loading_config": {"model_id": "c"}},
            str(tmp_path / "b.yaml"),
        ]
    )
    assert [c.model_id for c in args.llm_configs] == ["a", "c", "b"]
    with pytest.raises(ValidationError, match="unique"):
        LLMServingArgs(llm_configs=[{"model_loading_config": {"model_id": "a"}}] * 2)
    with pytest.raises(ValidationError, match="does not exist"):
        LLMServingArgs(llm_configs=[str(tmp_path / "missing.yaml")])


def test_placement_group_and_start_timeout_are_checked() -> None:
    config = LLMConfig(
        model_loading_config={"model_id": "a"},
        placement_group_config={"bundles": [{"CPU": 1}, {"CPU": 2}], "strategy": "SPREAD"},
    )
    assert config.placement_group_config is not None
    assert config.placement_group_config.bundles == [{"CPU": 1.0}, {"CPU": 2.0}]
    assert config.engine_start_timeout_s == 600
    with pytest.raises(ValidationError, match="strategy"):
        LLMConfig(
            model_loading_config={"model_id": "a"},
            placement_group_config={"bundles": [{"CPU": 1}], "strategy": "CLOSE"},
        )
    with pytest.raises(ValidationError, match="bundles"):
        LLMConfig(model_loading_config={"model_id": "a"}, placement_group_config={"bundles": []})
    with pytest.raises(ValidationError, match="engine_start_timeout_s"):
        LLMConfig(model_loading_config={"model_id": "a"}, engine_start_timeout_s=0)


def test_tensor_parallel_reserves_a_bundle_per_rank_on_one_node() -> None:
    """As Ray Serve LLM: tensor_parallel_size ranks, one bundle each (CPU, or the GPU and the
    accelerator type), packed on one node; an explicit placement_group_config wins."""
    cpu = LLMConfig(
        model_loading_config={"model_id": "a"}, engine_kwargs={"tensor_parallel_size": 2}
    ).get_serve_options()
    assert cpu["placement_group_bundles"] == [{"CPU": 1.0}] * 2
    assert cpu["placement_group_strategy"] == "STRICT_PACK"
    gpu = LLMConfig(
        model_loading_config={"model_id": "a"},
        engine_kwargs={"tensor_parallel_size": 4},
        accelerator_type="H100",
    ).get_serve_options()
    assert (
        gpu["placement_group_bundles"]
        == [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:H100": 0.001}] * 4
    )
    explicit = LLMConfig(
        model_loading_config={"model_id": "a"},
        engine_kwargs={"tensor_parallel_size": 2},
        placement_group_config={"bundles": [{"CPU": 2}]},
    ).get_serve_options()
    assert explicit["placement_group_bundles"] == [{"CPU": 2.0}]
    one = LLMConfig(model_loading_config={"model_id": "a"}).get_serve_options()
    assert "placement_group_bundles" not in one


def test_missing_ray_is_a_readable_error() -> None:
    """Where Ray is not installed, importing lmserve.serve says which extra to install."""
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "try:\n    import lmserve.serve\n"
        "except ImportError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'lmserve[ray]'" in out.stdout
