"""PEFT LoRA checkpoints: read, checked against the base model, and split per layer.

A checkpoint is a directory with adapter_config.json (`r`, `lora_alpha`, `use_rslora`) and
adapter_model.safetensors, whose tensors are named like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]; lora_B is [out, r]).
Only the decoder's linear layers can be adapted; embeddings, the LM head and `modules_to_save`
are refused with an error naming them.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from lmserve.config import ModelConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterConfig:
    path: Path
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora), as PEFT applies it


@dataclass(frozen=True)
class Adapter:
    config: AdapterConfig
    # (layer, target) -> (A [r, in], B [out, r]) in fp32
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def read_adapter_config(path: str | Path, model: ModelConfig, max_rank: int) -> AdapterConfig:
    """Check a checkpoint without loading its weights (names and shapes come from the header);
    every problem is a ValueError that says what to fix."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} has no adapter_config.json")
    if not (path / _WEIGHTS).is_file():
        raise ValueError(f"LoRA adapter {str(path)!r} has no {_WEIGHTS} (save it with PEFT)")
    peft = json.loads(config_file.read_text())
    rank, alpha = int(peft.get("r", 8)), float(peft.get("lora_alpha", 8))
    if rank > max_rank:
        raise ValueError(
            f"LoRA adapter {str(path)!r} has rank {rank}, above max_lora_rank={max_rank}; "
            "raise --max-lora-rank"
        )
    if peft.get("use_dora"):
        raise ValueError(
            f"LoRA adapter {str(path)!r} is a DoRA adapter (use_dora), which lmserve cannot "
            "serve; only plain LoRA adapters are supported"
        )
    if str(peft.get("init_lora_weights", "")).lower().startswith(("pissa", "olora", "corda")):
        raise ValueError(
            f"LoRA adapter {str(path)!r} was initialized with {peft['init_lora_weights']!r}, "
            "which changes the base weights as well; convert it to a plain LoRA adapter "
            "(PEFT's path_initial_model_for_weight_conversion) to serve it"
        )
    if peft.get("modules_to_save"):
        raise ValueError(
            f"LoRA adapter {str(path)!r} also trains {peft['modules_to_save']}, which lmserve "
            "cannot serve; only adapters on the decoder's linear layers are supported"
        )
    halves: dict[tuple[int, str], set[str]] = {}
    with safe_open(path / _WEIGHTS, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            layer, target, which = _check_tensor(
                name, f.get_slice(name).get_shape(), rank, model, path
            )
            halves.setdefault((layer, target), set()).add(which)
    for (layer, target), found in halves.items():
        if found != {"A", "B"}:
            raise ValueError(
                f"LoRA adapter {str(path)!r} has lora_{found.pop()} but not its other half for "
                f"layer {layer} {target}"
            )
    scaling = alpha / math.sqrt(rank) if peft.get("use_rslora") else alpha / rank
    return AdapterConfig(path, rank, scaling)


def load_adapter(config: AdapterConfig) -> Adapter:
    weights: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    with safe_open(config.path / _WEIGHTS, framework="pt") as f:
        for name in f.keys():  # noqa: SIM118
            parsed = _parse_key(name)
            assert parsed is not None, name  # read_adapter_config checked every name
            layer, target, which = parsed
            pair = weights.setdefault((layer, target), [None, None])
            pair[0 if which == "A" else 1] = f.get_tensor(name).float()
    return Adapter(config, {key: (a, b) for key, (a, b) in weights.items()})


def _check_tensor(
    name: str, shape: list[int], rank: int, model: ModelConfig, path: Path
) -> tuple[int, str, str]:
    """(layer, target, "A" or "B") of a tensor that fits the base model; else a ValueError."""
    parsed = _parse_key(name)
    if parsed is None:
        raise ValueError(
            f"LoRA adapter {str(path)!r} adapts {name!r}; lmserve serves adapters on "
            f"{', '.join(TARGETS)} only"
        )
    layer, target, which = parsed
    if layer >= model.num_layers:
        raise ValueError(
            f"LoRA adapter {str(path)!r} adapts layer {layer}, the model has {model.num_layers}"
        )
    in_features, out_features = _linear_shape(model, target)
    expected = [rank, in_features] if which == "A" else [out_features, rank]
    if list(shape) != expected:
        raise ValueError(
            f"LoRA adapter {str(path)!r}: {name} is {list(shape)}, expected {expected} for this "
            "base model (was it trained on another model?)"
        )
    return layer, target, which


def _parse_key(name: str) -> tuple[int, str, str] | None:
    """(layer, target, "A" or "B") of a PEFT tensor name on a supported projection, else None."""
    match = _KEY.search(name)
    if match is None or match[2] not in TARGETS:
        return None
    return int(match[1]), match[2], match[3]


def _linear_shape(model: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) features of a target projection of the base model."""
    hidden = model.hf_config["hidden_size"]
    inter = model.hf_config["intermediate_size"]
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }[target]
