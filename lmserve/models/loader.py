"""Build a model from its config and fill it: safetensors shards, or random ("dummy") weights."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lmserve.config import ModelConfig
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.layers.tensor_parallel import TensorParallel
from lmserve.models.registry import resolve_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def load_model(
    config: ModelConfig,
    device: torch.device,
    pooling: bool = False,
    tp: TensorParallel | None = None,
) -> nn.Module:
    """Instantiate on `device` in the configured dtype and load weights; eval mode, no grads.
    `pooling`: the pooling runner's class for the architecture; `tp`: this rank's share of a
    tensor-parallel model (each rank loads its slices of the checkpoint)."""
    cls = resolve_model_class(config.architecture, pooling)
    start = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype(config.dtype))
    try:
        with torch.device(device):
            model = cls(config.hf_config) if tp is None else cls(config.hf_config, tp=tp)
    finally:
        torch.set_default_dtype(default_dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.keep_positions(config.max_model_len)
    if config.quantization in ("gguf", "gguf_q8"):
        _load_gguf_blocks(model, config)
    elif config.quantization == "int4" and config.load_format != "dummy":
        _load_int4(model, config.path)
    elif config.load_format == "dummy":
        _init_dummy(model, config.seed)
        model.tie_weights()
    else:
        _load_safetensors(model, config.path)
    model.eval().requires_grad_(False)
    if config.quantization == "int8":
        from lmserve.layers.int8_linear import quantize_linears

        quantize_linears(model)
    elif config.quantization == "int4" and config.load_format == "dummy":
        from lmserve.layers.gguf_layers import quantize_linears_int4
        from lmserve.layers.linear import Linear

        quantize_linears_int4(model, Linear)
    logger.info(
        "loaded %s (%s, %s%s) in %.1f s",
        config.model,
        config.architecture,
        config.dtype,
        f", {config.quantization}" if config.quantization else "",
        time.perf_counter() - start,
    )
    return model


def _load_safetensors(model: nn.Module, path: Path) -> None:
    from lmserve.models.gguf import ensure_hf_weights, gguf_source

    if gguf_source(path) is not None:  # a converted GGUF: its float32 weights, written once
        ensure_hf_weights(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {path}; use load_format='dummy' for random weights"
        )
    _check_complete(model, model.load_weights(_iter_tensors(files)), f"checkpoint in {path}")


def _check_complete(model: nn.Module, loaded: set[str], source: str) -> None:
    """Every parameter of `model` was loaded, or an error naming the first missing ones."""
    missing = {name for name, _ in model.named_parameters()} - loaded
    if missing:
        raise ValueError(f"{source} lacks weights: {sorted(missing)[:5]}")


def _load_gguf_blocks(model: nn.Module, config: ModelConfig) -> None:
    """The linear layers and the token embedding from the GGUF file's blocks
    (layers/gguf_layers.py), everything else dequantized from it: the float32 weights the model
    was built with are swapped out before anything is written to them, so their memory is never
    touched."""
    from lmserve.layers.gguf_layers import replace_embeddings, replace_linears
    from lmserve.layers.linear import Linear
    from lmserve.models.gguf import gguf_source, iter_gguf_weights

    source = gguf_source(config.path)
    if source is None:
        raise ValueError(f"quantization='gguf' needs a .gguf model; {config.path} is not one")
    layers = replace_linears(model, Linear, q8_activations=config.quantization == "gguf_q8")
    replace_embeddings(model)
    tied = bool(getattr(model, "tie_word_embeddings", False))
    loaded = model.load_weights(iter_gguf_weights(source, config.hf_config, tied))
    for layer in layers:
        layer.finish_loading()
    _check_complete(model, loaded, str(source))


def _load_int4(model: nn.Module, path: Path) -> None:
    """quantization="int4" from safetensors: the linear layers are swapped for empty block
    layers before loading and store each checkpoint tensor as blocks as it comes, so the float32
    linears are never all in memory; a tied LM head is quantized from the loaded embedding."""
    from lmserve.layers.gguf_layers import replace_linears_int4
    from lmserve.layers.linear import Linear

    layers = replace_linears_int4(model, Linear)
    _load_safetensors(model, path)
    for module in model.modules():  # the model, or the language model inside a VLM
        head = getattr(module, "lm_head", None)
        if getattr(module, "tie_word_embeddings", False) and any(head is x for x in layers):
            table = module.model.embed_tokens.weight
            head.load_rows("weight", table, 0, table.shape[0])
    for layer in layers:
        layer.finish_loading()


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from lmserve.models.safetensors_stream import iter_streamed, read_header

    count = 0
    for file in files:
        with open(file, "rb") as handle:
            count += len(read_header(handle)[0])
    progress = tqdm(total=count, desc="Loading weights", unit="tensor", leave=False)
    with progress:
        for file in files:
            for item in iter_streamed(file):
                yield item
                progress.update()


def _init_dummy(model: nn.Module, seed: int) -> None:
    """Random weights with the real shapes: small normal values, norms at one, biases at zero.
    Drawn on the model's device: an 8B shape's weights take seconds there, a minute on a CPU."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, 0.02, generator=generator)
