"""The loader's quantized paths checked against the float32 model they stand for."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmserve.engine.args import create_engine_config
from lmserve.kernels import cpu_ops
from lmserve.layers.gguf_layers import GGUFLinear, quantize_linears_int4
from lmserve.layers.linear import Linear
from lmserve.models.loader import load_model
from tests.conftest import TINY_KINDS


@pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")
@pytest.mark.parametrize("kind", TINY_KINDS)
def test_int4_streamed_equals_quantizing_the_loaded_model(tiny_model_dirs, kind: str) -> None:
    """quantization="int4" from safetensors stores each tensor as blocks as it loads (the
    float32 linears never held whole): the same blocks, bias and layers as quantizing the
    float32 model once loaded, a tied LM head (qwen2, qwen3) quantized from the embedding."""
    config = create_engine_config(
        str(tiny_model_dirs[kind]), quantization="int4", kv_cache_memory_gb=0.01
    ).model
    streamed = load_model(config, torch.device("cpu"))
    reference = load_model(dataclasses.replace(config, quantization=None), torch.device("cpu"))
    assert quantize_linears_int4(reference, Linear) > 0
    ours, theirs = dict(streamed.named_modules()), dict(reference.named_modules())
    assert ours.keys() == theirs.keys()
    quantized = [name for name, module in ours.items() if isinstance(module, GGUFLinear)]
    assert "lm_head" in quantized and len(quantized) == 1 + 4 * len(streamed.model.layers)
    for name in quantized:
        assert isinstance(theirs[name], GGUFLinear), name
        mine, other = dict(ours[name].named_buffers()), dict(theirs[name].named_buffers())
        assert mine.keys() == other.keys(), name
        for key, buffer in mine.items():
            assert torch.equal(buffer, other[key]), f"{name}.{key}"
