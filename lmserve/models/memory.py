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
    weights). `int8` counts as float: it quantizes the loaded float model; so does `int4`, an
    upper bound now that it quantizes each tensor as it loads (its blocks take ~a sixth)."""
    from lmserve.layers.gguf_layers import kept_quantized
    from lmserve.models.gguf import gguf_source
    from lmserve.models.gguf_index import read_gguf_index

    if config.load_format == "dummy":
        return None
    element = torch_dtype(config.dtype).itemsize
    source = gguf_source(config.path)
    if source is not None:
        blocks = config.quantization in ("gguf", "gguf_q8")
        total = 0
        for tensor in read_gguf_index(source).tensors:
            if blocks and len(tensor.shape) == 2 and kept_quantized(int(tensor.tensor_type)):
                total += tensor.nbytes
            else:
                total += math.prod(tensor.shape) * element
        return total
    files = sorted(config.path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(path, framework="np") as handle:
            for name in handle.keys():  # noqa: SIM118 - not a dict
                total += math.prod(handle.get_slice(name).get_shape()) * element
    return total
