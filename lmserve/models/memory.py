"""The memory a model's weights take once loaded, read from the checkpoint's headers before
anything is loaded, so that a model that cannot fit is refused up front with what it needs
instead of being killed by the kernel half way through."""

from __future__ import annotations

import math

from lmserve.config import ModelConfig
from lmserve.models.loader import torch_dtype


def weight_bytes(config: ModelConfig) -> int | None:
    """Bytes of the loaded weights: a GGUF's blocks as stored where `quantization="gguf"` keeps
    them, every other tensor at `config.dtype`; None where the checkpoint says nothing (dummy
    weights). `int8` counts as float: it quantizes the loaded float model. `int4` counts its
    blocks, from a safetensors checkpoint or a GGUF file (it quantizes each tensor as it
    loads)."""
    from lmserve.layers.gguf_layers import kept_quantized
    from lmserve.models.gguf import gguf_source
    from lmserve.models.gguf_index import read_gguf_index

    if config.load_format == "dummy":
        return None
    element = torch_dtype(config.dtype).itemsize
    source = gguf_source(config.path)
    if source is not None:
        blocks = config.quantization in ("gguf", "gguf_q8")
        int4 = config.quantization == "int4"
        total, has_head = 0, False
        for tensor in read_gguf_index(source).tensors:
            has_head |= tensor.name == "output.weight"
            if blocks and len(tensor.shape) == 2 and kept_quantized(int(tensor.tensor_type)):
                total += tensor.nbytes
            else:
                kept = _int4_gguf_bytes(tensor.name, tensor.shape) if int4 else 0
                total += kept or math.prod(tensor.shape) * element
        return total + (_tied_int4_head(config) if int4 and not has_head else 0)
    files = sorted(config.path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total, has_head = 0, False
    int4 = config.quantization == "int4"
    for path in files:
        with safe_open(path, framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118 - not a dict
                shape = handle.get_slice(name).get_shape()
                has_head |= name.endswith("lm_head.weight")
                blocks = _int4_bytes(name, shape) if int4 else 0
                total += blocks or math.prod(shape) * element
    if int4 and not has_head:
        total += _tied_int4_head(config)
    return total


def _tied_int4_head(config: ModelConfig) -> int:
    """int4 keeps a tied LM head as Q8_0 blocks of its own (the embedding stays float)."""
    if not config.hf_config.get("tie_word_embeddings"):
        return 0
    return math.ceil(_Q8_0 * config.vocab_size * int(config.hf_config["hidden_size"]))


# bytes per weight of int4's blocks: Q4_1 (20 bytes per 32) and the LM head's Q8_0 (34 per 32)
_Q4_1, _Q8_0 = 20 / 32, 34 / 32


def _int4_bytes(name: str, shape: list[int]) -> int:
    """A checkpoint tensor's bytes as `int4` keeps it: a linear layer's weight [out, in] with
    `in` a multiple of 32 as blocks; 0 for what stays float (embeddings, norms, biases, convs,
    experts, which the loader stacks into float tensors, stored stacked or one by one)."""
    if len(shape) != 2 or not name.endswith(".weight") or shape[1] % 32:
        return 0
    if "embed" in name or ".experts." in name:
        return 0
    return math.ceil(math.prod(shape) * (_Q8_0 if name.endswith("lm_head.weight") else _Q4_1))


def _int4_gguf_bytes(name: str, shape: tuple[int, ...]) -> int:
    """As `_int4_bytes`, for a GGUF tensor (its shape innermost first; experts are 3-D, the
    embedding is token_embd, the LM head output)."""
    if len(shape) != 2 or not name.endswith(".weight") or shape[0] % 32:
        return 0
    if name.startswith("token_embd"):
        return 0
    return math.ceil(math.prod(shape) * (_Q8_0 if name == "output.weight" else _Q4_1))
