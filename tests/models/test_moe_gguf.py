"""Mixtures of experts from GGUF files laid out as llama.cpp writes them (stacked `ffn_*_exps`
experts, a `ffn_gate_inp` router, Qwen2-MoE's `*_shexp` shared expert, Mixtral as the `llama`
architecture with permuted q/k rows), written here from tiny HF models with SmolLM2's tokenizer:
the conversion equals transformers' own reading of the same file where transformers reads it,
and greedy tokens equal the HF model the file was written from."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from lmserve import LLM
from lmserve.models.gguf import bundled_smollm2_gguf, ensure_hf_weights, gguf_to_hf_dir
from tests.conftest import _COMMON, _randomize
from tests.engine.test_llm import hf_greedy, random_prompts, run_greedy

VOCAB = 49152  # SmolLM2's tokenizer, copied into every file
_SHAPE = {**_COMMON, "vocab_size": VOCAB, "tie_word_embeddings": False}
# transformers' GGUF reader does not read the experts' widths from the file: the defaults of its
# configs (Qwen1.5-MoE's and Qwen3-30B-A3B's widths) stand in, so these models use them
CONFIGS = {
    "qwen3moe": dict(
        _SHAPE, head_dim=16, moe_intermediate_size=768, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True,
    ),
    "qwen2moe": dict(
        _SHAPE, moe_intermediate_size=1408, num_experts=8,
        num_experts_per_tok=2, shared_expert_intermediate_size=5632,
    ),
    "mixtral": dict(_SHAPE, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip
_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


def _hf_model(kind: str) -> torch.nn.Module:
    import transformers as tf

    config_cls, model_cls = {
        "qwen3moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
        "qwen2moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
    }[kind]
    torch.manual_seed(11)
    model = model_cls(config_cls(**CONFIGS[kind], pad_token_id=0))
    _randomize(model)
    return model.eval()


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for the llama architecture: rotate-half pairs interleaved."""
    rows = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return rows.swapaxes(1, 2).reshape(weights.shape)


def _gguf_tensors(model: torch.nn.Module, kind: str) -> dict[str, np.ndarray]:
    """llama.cpp's names for the model's tensors; the experts stacked per layer."""
    cfg = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        weights = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = weights
        elif name == "model.norm.weight":
            out["output_norm.weight"] = weights
        elif name == "lm_head.weight":
            out["output.weight"] = weights
        elif name.endswith("mlp.experts.gate_up_proj"):
            layer = name.split(".")[2]
            gate, up = np.split(weights, 2, axis=1)
            out[f"blk.{layer}.ffn_gate_exps.weight"] = gate
            out[f"blk.{layer}.ffn_up_exps.weight"] = up
        elif name.endswith("mlp.experts.down_proj"):
            out[f"blk.{name.split('.')[2]}.ffn_down_exps.weight"] = weights
        else:
            _, _, layer, *rest = name.split(".")
            stem, suffix = ".".join(rest[:-1]), rest[-1]
            if kind == "mixtral" and stem == "self_attn.q_proj":
                weights = _permute(weights, cfg.num_attention_heads)
            elif kind == "mixtral" and stem == "self_attn.k_proj":
                weights = _permute(weights, cfg.num_key_value_heads)
            if stem == "mlp.shared_expert_gate":
                weights = weights.reshape(-1)
            out[f"blk.{layer}.{_LAYER[stem]}.{suffix}"] = weights
    return out


def _write_gguf(model: torch.nn.Module, kind: str, path: Path, vocab: dict) -> None:
    arch = "llama" if kind == "mixtral" else kind
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_expert_count(getattr(cfg, "num_local_experts", None) or cfg.num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if kind != "mixtral":
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if kind == "qwen3moe":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if kind == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(vocab["bos"])
    writer.add_eos_token_id(vocab["eos"])
    for name, weights in _gguf_tensors(model, kind).items():
        writer.add_tensor(name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def vocab() -> dict:
    """SmolLM2's BPE tokenizer, as its GGUF stores it."""
    reader = gguf.GGUFReader(bundled_smollm2_gguf())

    def field(key: str):
        return reader.get_field(f"tokenizer.ggml.{key}").contents()

    return {
        "model": field("model"),
        "pre": field("pre"),
        "tokens": field("tokens"),
        "types": field("token_type"),
        "merges": field("merges"),
        "bos": field("bos_token_id"),
        "eos": field("eos_token_id"),
    }


@pytest.fixture(scope="module")
def files(vocab, tmp_path_factory) -> dict[str, tuple[str, Path, torch.nn.Module]]:
    """Each kind's file, written once for the module (its conversion cached beside it)."""
    cache: dict[str, tuple[str, Path, torch.nn.Module]] = {}
    for kind in CONFIGS:
        model = _hf_model(kind)
        path = tmp_path_factory.mktemp(f"gguf-{kind}") / f"tiny-{kind}.gguf"
        _write_gguf(model, kind, path, vocab)
        cache[kind] = (kind, path, model)
    return cache


@pytest.fixture(params=list(CONFIGS))
def written(request, files) -> tuple[str, Path, torch.nn.Module]:
    """(kind, the file, the HF model it was written from)."""
    return files[request.param]


# transformers reads the Qwen MoE files, not Mixtral's
@pytest.mark.parametrize("written", ["qwen3moe", "qwen2moe"], indirect=True)
def test_conversion_equals_transformers_reading_the_file(written) -> None:
    kind, path, _ = written
    converted = gguf_to_hf_dir(path, path.parent / "cache" / "gguf")  # where LLM looks
    ours = load_file(ensure_hf_weights(converted))
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ours) == set(theirs)
    our_config = json.loads((converted / "config.json").read_text())
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        assert our_config[key] == getattr(config, key), key
    for name, tensor in theirs.items():
        np.testing.assert_array_equal(ours[name], tensor.float().numpy(), err_msg=name)


def test_greedy_equals_the_model_the_file_was_written_from(written) -> None:
    """Loaded by default (no dtype asked for): experts have no block kernels yet, so the file
    loads dequantized rather than with `quantization="gguf"`, which is refused up front."""
    kind, path, hf = written
    cache = str(path.parent / "cache")
    with pytest.raises(ValueError, match="models with experts yet: use quantization='int8'"):
        LLM(str(path), cache_dir=cache, quantization="gguf")
    prompts = [[t or 1 for t in p] for p in random_prompts([5, 17, 33, 9], seed=4)]
    llm = LLM(str(path), cache_dir=cache, max_num_batched_tokens=16)
    assert llm.config.model.architecture == type(hf).__name__
    assert llm.config.model.quantization is None
    assert run_greedy(llm, prompts) == [hf_greedy(hf, p, 20) for p in prompts]
