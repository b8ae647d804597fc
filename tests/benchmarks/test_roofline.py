"""Roofline bounds: model costs from a config, the per-step bound by hand, shipped shapes."""

from __future__ import annotations

import pytest
import torch

from lmserve.benchmarks.roofline import Hardware, ModelCost, measure_hardware, roofline_seconds
from lmserve.benchmarks.shapes import resolve_model
from lmserve.engine.args import create_engine_config


def test_llama3_8b_cost_from_its_shipped_shape() -> None:
    config = create_engine_config(resolve_model("Llama-3-8B"), load_format="dummy", device="cpu")
    assert config.model.architecture == "LlamaForCausalLM" and config.model.num_layers == 32
    cost = ModelCost.from_config(config.model, weight_bytes=2, kv_bytes=2)
    # 8.03 B parameters, of which the input embedding (0.53 B) is not read by a step
    assert cost.flops_per_token == pytest.approx(2 * 7.505e9, rel=1e-3)
    assert cost.weight_bytes == pytest.approx(2 * 7.505e9, rel=1e-3)
    assert cost.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert cost.attn_flops_per_key == 4 * 32 * 4096


def test_shapes_resolve_by_name_only() -> None:
    qwen = resolve_model("qwen2.5-0.5b")
    assert qwen is not None and qwen.endswith("Qwen2.5-0.5B")
    config = create_engine_config(qwen, load_format="dummy", device="cpu")
    assert config.model.architecture == "Qwen2ForCausalLM" and config.model.num_layers == 24
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert resolve_model(None) is None


def test_roofline_by_hand() -> None:
    """1 byte/s and 1 op/s: prefill is 5 tokens x 10 ops; each decode step reads the weights
    (100 bytes) and one byte per key of every running request."""
    cost = ModelCost(
        weight_bytes=100, flops_per_token=10, kv_bytes_per_token=1, attn_flops_per_key=0
    )
    hw = Hardware(bandwidth_gb_s=1e-9, peak_tops=1e-12)
    # together: step 1 reads 100 + (2+1) + (3+1), step 2 only the first request: 100 + (2+2)
    assert roofline_seconds(cost, hw, [2, 3], [3, 2], max_num_seqs=2) == pytest.approx(
        50 + 107 + 104
    )
    # one at a time: 103 + 104 for the first, 104 for the second
    assert roofline_seconds(cost, hw, [2, 3], [3, 2], max_num_seqs=1) == pytest.approx(
        50 + 103 + 104 + 104
    )


@pytest.mark.parametrize("int8", [False, True])
def test_measure_hardware_on_cpu(int8: bool) -> None:
    hw = measure_hardware(torch.device("cpu"), torch.float32, int8=int8)
    assert 0.1 < hw.bandwidth_gb_s < 10_000 and 0.001 < hw.peak_tops < 1_000
