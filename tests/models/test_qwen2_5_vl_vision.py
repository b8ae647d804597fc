"""Qwen2.5-VL's vision tower against HF's on a tiny random config: window and full attention
layers, grids that windows fit exactly and that leave partial windows, two frames."""

from __future__ import annotations

import pytest
import torch

from lmserve.models.qwen2_5_vl_vision import Qwen2_5_VisionTower


@pytest.mark.parametrize("grid", [(1, 8, 12), (1, 6, 10), (2, 4, 4)], ids=str)
def test_merged_rows_equal_hf(grid: tuple[int, int, int]) -> None:
    import transformers as tf
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        Qwen2_5_VisionTransformerPretrainedModel,
    )

    torch.manual_seed(0)
    config = tf.Qwen2_5_VLVisionConfig(
        depth=4, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=56, out_hidden_size=48,
        fullatt_block_indexes=[1, 3],
    )  # fmt: skip
    hf = Qwen2_5_VisionTransformerPretrainedModel._from_config(config).eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.2)
    ours = Qwen2_5_VisionTower(config.to_dict()).eval()
    loaded = ours.load_weights(hf.state_dict().items())
    assert loaded == {name for name, _ in ours.named_parameters()}
    t, h, w = grid
    patches = torch.randn(t * h * w, 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = hf(patches, grid_thw=torch.tensor([grid])).pooler_output
        got = ours(patches.view(1, t, h, w, -1))
    assert got.shape == (1, t * h * w // 4, 48)
    assert (got[0] - expected).abs().max().item() < 1e-5
