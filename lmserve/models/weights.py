"""Checkpoint tensors copied into a module's parameters by their HF names."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def copy_named(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Each (name, tensor) into the parameter of that name; a name with no parameter is an
    error that names it. Returns the names loaded."""
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(module).__name__}")
        with torch.no_grad():
            params[name].copy_(tensor)
        loaded.add(name)
    return loaded
