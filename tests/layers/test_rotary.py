"""RoPE tables against HF's own initialization of each scaling kind."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmserve.layers.rotary import RotaryEmbedding

HEAD_DIM = 64
SCALINGS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    # gpt-oss's (untruncated ramp), and DeepSeek's form with mscale terms (truncated)
    "yarn-gpt-oss": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 64,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 128,
    },
    # Phi-3's: factors per band, the short or the long ones as the engine decided
    **{
        f"longrope-{length}": {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
            "long_factor": [1.0 + 0.7 * i for i in range(HEAD_DIM // 2)],
            "original_max_position_embeddings": 256,
            "long_context": length == "long",
        }
        for length in ("short", "long")
    },
}


@pytest.mark.parametrize("scaling", SCALINGS.values(), ids=SCALINGS.keys())
def test_tables_equal_hfs_cos_and_sin(scaling) -> None:
    theta = 150000.0
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rope_parameters={
            **{k: v for k, v in scaling.items() if k != "long_context"},
            "rope_theta": theta,
        },
    )
    init = ROPE_INIT_FUNCTIONS.get(scaling["rope_type"])
    if scaling["rope_type"] == "default":
        inv_freq, factor = 1.0 / (theta ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)), 1.0
    elif scaling.get("long_context"):  # HF's tables for a sequence past the original context
        inv_freq, factor = init(
            config, None, seq_len=scaling["original_max_position_embeddings"] + 1
        )
    else:
        inv_freq, factor = init(config, None)
    positions = torch.arange(0, 2048, 7)
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1)
    rope = RotaryEmbedding(HEAD_DIM, 2048, theta, scaling)
    cos, signed_sin = rope(positions, torch.float32)
    torch.testing.assert_close(cos[:, 0], emb.cos() * factor, atol=0, rtol=0)
    half = HEAD_DIM // 2
    torch.testing.assert_close(
        signed_sin[:, 0, half:], (emb.sin() * factor)[:, half:], atol=0, rtol=0
    )
    if scaling["rope_type"] in ("yarn", "longrope"):
        assert factor != 1.0  # the attention scaling is part of what is compared


def test_an_unknown_scaling_names_the_supported_ones() -> None:
    with pytest.raises(ValueError, match="supported: linear, llama3, yarn, longrope"):
        RotaryEmbedding(HEAD_DIM, 16, 10000.0, {"rope_type": "dynamic", "factor": 2.0})


def test_keeping_fewer_positions_keeps_their_values() -> None:
    """A model served with a shorter max_model_len drops the rows past it, not their numbers
    (yarn's attention factor still comes from the model's own max_position)."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    rope = RotaryEmbedding(64, 1024, 10000.0, scaling)
    positions = torch.tensor([0, 5, 99, 127, 3])
    before = rope(positions, torch.float32)
    rope.keep_positions(128)
    assert rope.cos_cache.shape == rope.signed_sin_cache.shape == (128, 64)
    for ours, theirs in zip(rope(positions, torch.float32), before, strict=True):
        assert torch.equal(ours, theirs)
    rope.keep_positions(4096)  # more than it has: unchanged
    assert rope.cos_cache.shape[0] == 128
