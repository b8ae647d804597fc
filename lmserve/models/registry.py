"""HF `architectures` name -> model class, imported only when that architecture is asked for."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS = {
    "LlamaForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "BertModel": "lmserve.models.bert:BertModel",  # pooling runner only
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    module_name, cls_name = _MODELS[architecture].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
