"""Convert a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json) into an HF
`WhisperForConditionalGeneration` directory, cached like the GGUF conversion.

CTranslate2's model.bin (binary version 6) is a header, then named tensors, then aliases:

    u32 version | str spec name | u32 spec revision | u32 count
    count x (str name | u8 rank | rank x u32 dims | u8 dtype | u32 nbytes | data)
    u32 aliases | aliases x (str alias | str name)

where a str is a u16 byte length and the bytes (NUL-terminated). Whisper's self-attention q/k/v
are fused into one `linear_0`, cross-attention's k/v into `linear_1`; layer norms are
gamma/beta. Weights stay in the file's dtype (fp16 for tiny.en); the loader casts them.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from lmserve.models.conversion_cache import convert_once

CONVERTER_VERSION = 1
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_NUM_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>, every 0.02 s


def is_ctranslate2_whisper(path: Path) -> bool:
    """A directory holding a CTranslate2 Whisper model (read from model.bin's header)."""
    model = path / "model.bin"
    if not model.is_file():
        return False
    with model.open("rb") as f:
        head = f.read(64)
    return len(head) > 6 and head[6 : 6 + len(b"WhisperSpec")] == b"WhisperSpec"


def ctranslate2_to_hf_dir(path: Path, cache_root: Path) -> Path:
    """Convert once, then reuse; the cache key covers model.bin."""
    return convert_once(path / "model.bin", cache_root, CONVERTER_VERSION, _convert)


def read_model_bin(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    """(spec name, tensors by name, aliases resolved)."""
    buf = memoryview(path.read_bytes())
    offset = 0

    def take(fmt: str) -> Any:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, buf, offset)
        offset += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal offset
        size = take("<H")
        value = bytes(buf[offset : offset + size]).rstrip(b"\0").decode()
        offset += size
        return value

    version = take("<I")
    if version != 6:
        raise ValueError(f"{path}: CTranslate2 binary version {version} (this reads version 6)")
    spec = text()
    take("<I")  # spec revision
    tensors: dict[str, np.ndarray] = {}
    for _ in range(take("<I")):
        name = text()
        dims = [take("<I") for _ in range(take("<B"))]
        dtype, size = take("<B"), take("<I")
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has CTranslate2 dtype {dtype} (not read)")
        data = np.frombuffer(buf[offset : offset + size], dtype=_DTYPES[dtype])
        tensors[name] = data.reshape(dims).copy()
        offset += size
    for _ in range(take("<I")):
        alias, target = text(), text()
        tensors[alias] = tensors[target]
    return spec, tensors


def _convert(model_bin: Path, out: Path) -> None:
    src = model_bin.parent
    spec, tensors = read_model_bin(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{src}: a CTranslate2 {spec} model; lmserve converts Whisper only")
    ct2_config = json.loads((src / "config.json").read_text())
    config = _config(tensors, ct2_config)
    weights = _hf_tensors(tensors)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(_generation_config(config, ct2_config, src), indent=2)
    )
    _write_processor(src, out, config)


def _layers(tensors: dict[str, np.ndarray], side: str) -> int:
    found = {int(m.group(1)) for n in tensors if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    return max(found) + 1


def _config(tensors: dict[str, np.ndarray], ct2_config: dict[str, Any]) -> dict[str, Any]:
    vocab, d_model = tensors["decoder/embeddings/weight"].shape
    return {
        "architectures": ["WhisperForConditionalGeneration"],
        "model_type": "whisper",
        "vocab_size": int(vocab),
        "num_mel_bins": int(tensors["encoder/conv1/weight"].shape[1]),
        "d_model": int(d_model),
        "encoder_layers": _layers(tensors, "encoder"),
        "decoder_layers": _layers(tensors, "decoder"),
        "encoder_attention_heads": int(tensors["encoder/num_heads"]),
        "decoder_attention_heads": int(tensors["decoder/num_heads"]),
        "encoder_ffn_dim": int(tensors["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(tensors["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(tensors["encoder/position_encodings/encodings"].shape[0]),
        "max_target_positions": int(tensors["decoder/position_encodings/encodings"].shape[0]),
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50257,
        "decoder_start_token_id": 50257,
        "eos_token_id": 50256,
        "pad_token_id": 50256,
        "torch_dtype": str(tensors["decoder/embeddings/weight"].dtype),
    }


def _hf_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for side in ("encoder", "decoder"):
        prefix = f"model.{side}"
        out[f"{prefix}.embed_positions.weight"] = tensors[f"{side}/position_encodings/encodings"]
        out[f"{prefix}.layer_norm.weight"] = tensors[f"{side}/layer_norm/gamma"]
        out[f"{prefix}.layer_norm.bias"] = tensors[f"{side}/layer_norm/beta"]
        for i in range(_layers(tensors, side)):
            ct, hf = f"{side}/layer_{i}", f"{prefix}.layers.{i}"
            _attention(out, tensors, f"{ct}/self_attention", f"{hf}.self_attn", fused="qkv")
            _norm(out, tensors, f"{ct}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
            if side == "decoder":
                _attention(out, tensors, f"{ct}/attention", f"{hf}.encoder_attn", fused="kv")
                _norm(out, tensors, f"{ct}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
            _norm(out, tensors, f"{ct}/ffn/layer_norm", f"{hf}.final_layer_norm")
            for j, name in enumerate(("fc1", "fc2")):
                out[f"{hf}.{name}.weight"] = tensors[f"{ct}/ffn/linear_{j}/weight"]
                out[f"{hf}.{name}.bias"] = tensors[f"{ct}/ffn/linear_{j}/bias"]
    for conv in ("conv1", "conv2"):
        for kind in ("weight", "bias"):
            out[f"model.encoder.{conv}.{kind}"] = tensors[f"encoder/{conv}/{kind}"]
    out["model.decoder.embed_tokens.weight"] = tensors["decoder/embeddings/weight"]
    return {name: np.ascontiguousarray(t) for name, t in out.items()}


def _norm(out: dict, tensors: dict, ct: str, hf: str) -> None:
    out[f"{hf}.weight"] = tensors[f"{ct}/gamma"]
    out[f"{hf}.bias"] = tensors[f"{ct}/beta"]


def _attention(out: dict, tensors: dict, ct: str, hf: str, fused: str) -> None:
    """q/k/v/out projections from CTranslate2's fused ones; Whisper's k has no bias (the fused
    bias holds zeros there)."""
    if fused == "qkv":
        weights = np.split(tensors[f"{ct}/linear_0/weight"], 3)
        biases = np.split(tensors[f"{ct}/linear_0/bias"], 3)
        output = 1
    else:
        weights = [tensors[f"{ct}/linear_0/weight"], *np.split(tensors[f"{ct}/linear_1/weight"], 2)]
        biases = [tensors[f"{ct}/linear_0/bias"], *np.split(tensors[f"{ct}/linear_1/bias"], 2)]
        output = 2
    for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), weights, biases, strict=True):
        out[f"{hf}.{name}.weight"] = weight
        if name != "k_proj":
            out[f"{hf}.{name}.bias"] = bias
    out[f"{hf}.out_proj.weight"] = tensors[f"{ct}/linear_{output}/weight"]
    out[f"{hf}.out_proj.bias"] = tensors[f"{ct}/linear_{output}/bias"]


def _generation_config(config: dict[str, Any], ct2: dict[str, Any], src: Path) -> dict[str, Any]:
    """What HF's Whisper generate reads: the special tokens, the suppressed ones, and for a
    multilingual checkpoint its languages and tasks."""
    vocab = json.loads((src / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    multilingual = config["vocab_size"] >= 51865
    generation: dict[str, Any] = {
        "alignment_heads": ct2.get("alignment_heads", []),
        "begin_suppress_tokens": list(ct2.get("suppress_ids_begin", [])),
        "suppress_tokens": list(ct2.get("suppress_ids", [])),
        "bos_token_id": config["bos_token_id"],
        "decoder_start_token_id": config["decoder_start_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "is_multilingual": multilingual,
        "max_initial_timestamp_index": 50,
        "max_length": config["max_target_positions"],
        "return_timestamps": False,
    }
    if multilingual:
        languages = {name: i for name, i in ids.items() if i in set(ct2.get("lang_ids", []))}
        generation["lang_to_id"] = languages
        generation["task_to_id"] = {"transcribe": ids["<|transcribe|>"],
                                    "translate": ids["<|translate|>"]}  # fmt: skip
    return generation


def _write_processor(src: Path, out: Path, config: dict[str, Any]) -> None:
    """HF's Whisper tokenizer over the model's tokenizer.json, with the timestamp tokens the
    vocabulary ends in, and its feature extractor: what AutoProcessor loads."""
    from transformers import AddedToken, WhisperFeatureExtractor, WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))
    start = len(tokenizer)
    missing = config["vocab_size"] - start
    if 0 < missing <= _NUM_TIMESTAMPS:
        stamps = [f"<|{i * 0.02:.2f}|>" for i in range(missing)]
        tokenizer.add_tokens([AddedToken(s, lstrip=False, rstrip=False) for s in stamps])
    tokenizer.model_max_length = config["max_target_positions"]
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config["num_mel_bins"]).save_pretrained(out)
