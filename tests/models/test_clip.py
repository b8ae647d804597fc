"""CLIP's vision tower against HF's CLIPVisionModel on a tiny random config: every layer's
hidden states (what LLaVA reads is layer -2), batched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmserve.models.clip import CLIPVisionTower


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hidden_states_equal_hf(tmp_path: Path, act: str) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                 num_attention_heads=4, image_size=28, patch_size=7,
                                 hidden_act=act)  # fmt: skip
    hf = tf.CLIPVisionModel(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    hf.save_pretrained(tmp_path)
    ours = CLIPVisionTower(config.to_dict())
    loaded = ours.load_weights(load_file(tmp_path / "model.safetensors").items())
    assert loaded == {name for name, _ in ours.named_parameters()}
    pixels = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        expected = hf(pixels, output_hidden_states=True).hidden_states
        for layer in (-2, -1, 0, 1):
            got = ours.eval()(pixels, feature_layer=layer)
            assert got.shape == (3, 17, 32)
            assert (got - expected[layer]).abs().max().item() < 1e-5, layer
    with pytest.raises(ValueError, match="reads 28x28 images"):
        ours(torch.randn(1, 3, 32, 32))
