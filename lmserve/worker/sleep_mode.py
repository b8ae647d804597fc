"""Sleep mode's weights, for the target and a draft model alike: where a sleeping model's
weights go, and how they come back."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.models.loader import load_model


def put_to_sleep(model: nn.Module, level: int, device: torch.device) -> None:
    """Unbind the model's KV cache; level 2 frees every weight (the model goes to the meta
    device), level 1 moves them to host memory on CUDA (on CPU they stay where they are)."""
    for layer in model.attention_layers():
        layer.kv_cache = None
    if level == 2:
        model.to("meta")
    elif device.type == "cuda":
        model.to("cpu")


def wake_weights(model: nn.Module, config: ModelConfig, device: torch.device) -> nn.Module:
    """The model to use after a sleep: loaded again (seeded as at start) after level 2, moved
    back to the GPU after level 1, else the same one."""
    if next(model.parameters()).is_meta:
        torch.manual_seed(config.seed)
        return load_model(config, device)
    if device.type == "cuda":
        model.to(device)
    return model
