"""HF `architectures` name -> model class, imported only when that architecture is asked for."""

from __future__ import annotations

import importlib

from torch import nn

_MODELS = {
    "Gemma2ForCausalLM": "lmserve.models.gemma:GemmaForCausalLM",
    "Gemma3ForCausalLM": "lmserve.models.gemma:GemmaForCausalLM",
    "GptOssForCausalLM": "lmserve.models.gpt_oss:GptOssForCausalLM",
    "LlamaForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "MixtralForCausalLM": "lmserve.models.moe:MoeForCausalLM",
    "Phi3ForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen2MoeForCausalLM": "lmserve.models.moe:MoeForCausalLM",
    "Qwen3ForCausalLM": "lmserve.models.llama:LlamaForCausalLM",
    "Qwen3MoeForCausalLM": "lmserve.models.moe:MoeForCausalLM",
    "LlavaForConditionalGeneration": "lmserve.models.llava:LlavaForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "lmserve.models.qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
    "WhisperForConditionalGeneration": "lmserve.models.whisper:WhisperForConditionalGeneration",
}
# the pooling runner's: encoders, and decoders run whole-prompt with no KV cache
_POOLING_MODELS = {
    "BertModel": "lmserve.models.bert:BertModel",
    "BertForSequenceClassification": "lmserve.models.bert:BertForSequenceClassification",
    "RobertaModel": "lmserve.models.bert:BertModel",
    "XLMRobertaModel": "lmserve.models.bert:BertModel",
    "RobertaForSequenceClassification": "lmserve.models.bert:RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification": "lmserve.models.bert:RobertaForSequenceClassification",
    **{
        f"{family}For{kind}": "lmserve.models.llama:LlamaForPooling"
        for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
        for kind in ("CausalLM", "SequenceClassification")
    },
}

# checkpoints whose q/k/v and gate/up come as separate tensors, which split across ranks as
# they load (Phi-3's come fused)
_TENSOR_PARALLEL = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
}


def tensor_parallel_architectures() -> list[str]:
    """The architectures the generate runner splits across tensor-parallel ranks."""
    return sorted(_TENSOR_PARALLEL)


def supported_architectures(pooling: bool = False) -> list[str]:
    return sorted(_POOLING_MODELS if pooling else _MODELS)


def resolve_model_class(architecture: str, pooling: bool = False) -> type[nn.Module]:
    """The class that runs `architecture` in the generate runner, or in the pooling runner."""
    models = _POOLING_MODELS if pooling else _MODELS
    if architecture not in models:
        raise ValueError(
            f"model architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(supported_architectures(pooling))}"
        )
    module_name, cls_name = models[architecture].split(":")
    return getattr(importlib.import_module(module_name), cls_name)
