"""The Llama family as one implementation: Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3, Phi-3.

Differences are config switches: qkv bias (Qwen2), per-head q/k RMSNorm and explicit head_dim
(Qwen3), tied embeddings, RoPE theta and scaling. Phi-3 checkpoints already fuse q/k/v and
gate/up, in the order these layers use. Q/K/V and gate/up are fused into one matmul
each, so a layer is a handful of ops. Tokens of all requests are flattened: [num_tokens, ...].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.forward_context import set_forward_context
from lmserve.layers.activation import silu_and_mul
from lmserve.layers.attention import Attention
from lmserve.layers.direct_call import DirectCall
from lmserve.layers.embedding import uninitialized_embedding
from lmserve.layers.gguf_layers import GGUFEmbedding, GGUFLinear
from lmserve.layers.linear import Linear
from lmserve.layers.norm import RMSNorm
from lmserve.layers.packed_attention import PackedLayout
from lmserve.layers.rotary import RotaryEmbedding, apply_rotary
from lmserve.layers.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    VocabParallelHead,
)
from lmserve.models.decode_layers import DecodeLoop, LayerParts
from lmserve.pooling.score import num_labels

# HF checkpoint name suffix -> (our fused parameter, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(DirectCall, nn.Module):
    def __init__(
        self, cfg: dict[str, Any], window: int | None = None, tp: TensorParallel | None = None
    ) -> None:
        """`tp`: this rank's share (`cfg` then holds its heads), O's partial sums all-reduced."""
        super().__init__()
        self.tp = tp
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = cfg.get("attention_bias")
        if bias is None:  # Qwen2 and Qwen2-MoE: biased q/k/v, unbiased o
            bias = cfg.get("model_type") in ("qwen2", "qwen2_moe") and cfg.get("qkv_bias", True)
        bias = bool(bias)
        o_bias = bool(cfg.get("attention_bias", False))
        if tp is None:
            self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
            self.o_proj = Linear(self.q_size, hidden, bias=o_bias)
        else:
            self.qkv_proj = ColumnParallelLinear(hidden, self.q_size + 2 * self.kv_size, tp, bias)
            self.o_proj = RowParallelLinear(self.q_size, hidden, tp, o_bias)
        self.qk_norm = cfg.get("model_type") in ("qwen3", "qwen3_moe")
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = RMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            sliding_window=window,
            sinks=cfg.get("model_type") == "gpt_oss",
        )

    def forward(self, rope: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size : self.q_size + self.kv_size]
            q = apply_rotary(self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim)), rope)
            k = apply_rotary(self.k_norm(k.view(num_tokens, -1, self.head_dim)), rope)
        else:
            # q and k heads are adjacent: rotate them in one go
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
            qk = apply_rotary(qk, rope)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = self.attn(q, k, v)  # [num_tokens, num_heads, head_dim]
        out = self.o_proj(out.view(num_tokens, self.q_size))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaMLP(DirectCall, nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        intermediate_size: int | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        bias = bool(cfg.get("mlp_bias", False))
        self.tp = tp
        self.intermediate_size = intermediate_size or cfg["intermediate_size"]
        hidden, width = cfg["hidden_size"], self.intermediate_size
        if tp is None:
            self.gate_up_proj = Linear(hidden, 2 * width, bias=bias)
            self.down_proj = Linear(width, hidden, bias=bias)
        else:
            self.gate_up_proj = ColumnParallelLinear(hidden, 2 * width, tp, bias)
            self.down_proj = RowParallelLinear(width, hidden, tp, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaDecoderLayer(DirectCall, nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        window: int | None = None,
        mlp: nn.Module | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.self_attn = LlamaAttention(cfg, window, tp)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.mlp = LlamaMLP(cfg, tp=tp) if mlp is None else mlp

    def forward(
        self, rope: tuple[torch.Tensor, ...], x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream): the residual add is fused into the next norm, which
        adds x into `residual` in place (the first layer's residual is its input)."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(rope, x), residual)
        return self.mlp(x), residual

    def decode_parts(self) -> LayerParts | None:
        """This layer's pieces for the one-call decode loop (models/decode_layers.py), or None
        where it is not the plain layer that loop runs."""
        attn, mlp = self.self_attn, self.mlp
        if attn.tp is not None or attn.qk_norm or type(mlp) is not LlamaMLP:
            return None
        return LayerParts(
            (self.input_layernorm, self.post_attention_layernorm),
            (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj),
            attn.attn,
        )


class LlamaModel(nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        mlp: Callable[[int], nn.Module | None] | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        """`mlp(i)`: layer i's MLP where it is not LlamaMLP (a mixture of experts), else None.
        `tp`: this rank's share of a tensor-parallel model (`cfg` is then the whole model's)."""
        super().__init__()
        if tp is None:
            self.embed_tokens = uninitialized_embedding(cfg["vocab_size"], cfg["hidden_size"])
        else:
            self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"], tp)
            cfg = tp.shard_config(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, window, mlp(i) if mlp else None, tp)
            for i, window in enumerate(sliding_windows(cfg))
        )
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        theta, scaling = _rope_config(cfg)
        partial = cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get(
            "partial_rotary_factor", 1.0
        )
        if float(partial) != 1.0:
            raise ValueError(
                f"partial_rotary_factor={partial} (rotary on part of each head) is not supported"
            )
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        self.rotary_emb = RotaryEmbedding(
            head_dim,
            cfg.get("max_position_embeddings", 2048),
            theta,
            scaling,
            _mrope_section(cfg),
        )
        # the decode step's layers in one C++ call, where they are ones it runs
        self.decode_loop = DecodeLoop()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if embeds is not None:  # prompt positions given as embeddings: (token indices, rows)
            x[embeds[0]] = embeds[1]
        rope = self.rotary_emb(positions, x.dtype)
        if embeds is None:
            out = self.decode_loop(
                lambda: [layer.decode_parts() for layer in self.layers], x, [rope]
            )
            if out is not None:
                return self.norm(*out)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        return self.norm(x, residual)


class LlamaForCausalLM(nn.Module):
    """forward() returns final hidden states; compute_logits() runs the LM head on the rows that
    need logits only (the last token of each sampled request)."""

    def __init__(
        self,
        cfg: dict[str, Any],
        model: nn.Module | None = None,
        tp: TensorParallel | None = None,
    ) -> None:
        """`model`: another family's decoder with LlamaModel's interface (default: LlamaModel).
        `tp`: this rank's share of a tensor-parallel model; its logits are gathered on rank 0
        (compute_logits gives None on the others)."""
        super().__init__()
        self.config = cfg
        self.tp = tp
        self.model = LlamaModel(cfg, tp=tp) if model is None else model
        self.tie_word_embeddings = bool(cfg.get("tie_word_embeddings", False))
        # With tied embeddings this is a transposed copy of embed_tokens, filled at load time:
        # the embedding wants rows per token, the LM head wants [in, out] for fast decode.
        if tp is None:
            self.lm_head = Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        else:
            self.lm_head = VocabParallelHead(cfg["hidden_size"], cfg["vocab_size"], tp)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # One row streams fastest through the [in, out] copy; from a few rows on, a GEMM on the
        # [out, in] embedding wins (measured, 49k x 576: 19.6 vs 28.9 ms at 16 rows).
        # (An int8 LM head, see layers/int8_linear.py, is faster than both.)
        if self.tie_word_embeddings and hidden.shape[0] > 1 and isinstance(self.lm_head, Linear):
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.tp is None:
            return logits
        return self.tp.gather_vocab(logits, self.config["vocab_size"])  # type: ignore[return-value]

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy HF-named tensors in, fusing q/k/v and gate/up; returns the parameters loaded."""
        # tied, the head is filled from the embedding, unless it keeps a GGUF file's blocks
        # (layers/gguf_layers.py), which come as lm_head.weight
        tied = self.tie_word_embeddings and isinstance(self.lm_head, Linear)
        loaded = _load_fused(
            self, ((n, t) for n, t in weights if not (tied and n == "lm_head.weight"))
        )
        if tied:
            self.tie_weights()
            loaded.add("lm_head.weight")
        return loaded

    def tie_weights(self) -> None:
        """Refresh the LM head's transposed copy of the embedding (tied models only)."""
        if self.tie_word_embeddings and isinstance(self.lm_head, Linear):
            with torch.no_grad():
                self.lm_head.weight.copy_(self.model.embed_tokens.weight.t())


class LlamaForPooling(nn.Module):
    """A Llama-family decoder in the pooling runner: whole prompts packed back to back, causal
    attention with no KV cache, final hidden states out. A `*ForSequenceClassification`
    checkpoint brings its `score` head (classify()); a `*ForCausalLM` one is an embedder and
    its LM head is not loaded."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        architecture = (cfg.get("architectures") or [""])[0]
        self.score: nn.Linear | None = None
        if architecture.endswith("ForSequenceClassification"):
            self.score = nn.Linear(cfg["hidden_size"], num_labels(cfg), bias=False)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: list[int]
    ) -> torch.Tensor:
        with set_forward_context(PackedLayout(seq_lens, input_ids.device)):
            return self.model(input_ids, positions)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[prompts, H] last-token rows -> [prompts, num_labels] logits."""
        if self.score is None:
            raise ValueError("this model has no classification head")
        return self.score(pooled)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _load_fused(self, ((n, t) for n, t in weights if n != "lm_head.weight"))

    def tie_weights(self) -> None:
        """No LM head to tie (the loader calls this after dummy weights)."""


def _load_fused(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """HF-named tensors into `model` (a `model.` LlamaModel and any plain parameters),
    q/k/v and gate/up fused; returns the parameters loaded."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    attn = model.model.layers[0].self_attn
    qkv_sizes = [attn.q_size, attn.kv_size, attn.kv_size]
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        module_name, _, kind = name.rpartition(".")
        parent, _, leaf = module_name.rpartition(".")
        if leaf in _FUSED:
            fused, shard = _FUSED[leaf]
            module_name = f"{parent}.{fused}"
            if fused == "qkv_proj":
                sizes = qkv_sizes
            else:  # this MLP's own width: a shared expert's differs from the config's
                sizes = [getattr(modules.get(module_name), "out_features", 0) // 2] * 2
            start, size = sum(sizes[:shard]), sizes[shard]
        else:
            start, size = 0, tensor.shape[0]
        module = modules.get(module_name)
        if isinstance(module, (Linear, GGUFLinear, GGUFEmbedding, VocabParallelEmbedding)):
            module.load_rows(kind, tensor, start, size)
            loaded.add(f"{module_name}.{kind}")
        elif name in params:
            with torch.no_grad():
                params[name].copy_(tensor)
            loaded.add(name)
        else:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
    return loaded


def sliding_windows(cfg: dict[str, Any]) -> list[int | None]:
    """Each layer's sliding window (None: global), as HF reads the config: Mistral and Phi-3
    window every layer when `sliding_window` is set; Qwen2/Qwen3 only with
    `use_sliding_window`, then the layers `layer_types` marks (default: from
    `max_window_layers` on); gpt-oss the layers `layer_types` marks (default: every other one,
    the first windowed)."""
    num_layers, window = cfg["num_hidden_layers"], cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return [None] * num_layers
    kinds = cfg.get("layer_types")
    if not kinds and cfg.get("model_type") == "gpt_oss":  # windowed and global, alternating
        kinds = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if not kinds and "use_sliding_window" in cfg:  # Qwen's layout
        kinds = [
            "sliding_attention" if i >= cfg.get("max_window_layers", 0) else "full_attention"
            for i in range(num_layers)
        ]
    if not kinds or cfg.get("model_type") == "mistral":  # HF's Mistral ignores layer_types
        return [int(window)] * num_layers
    return [int(window) if kind == "sliding_attention" else None for kind in kinds]


def _rope_config(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either config layout: `rope_theta`/`rope_scaling` (transformers 4)
    or `rope_parameters` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling and (scaling.get("rope_type") or scaling.get("type")) in ("mrope", "default"):
        scaling = None  # M-RoPE turns unscaled frequencies (its sections: _mrope_section)
    return theta, scaling


def _mrope_section(cfg: dict[str, Any]) -> list[int] | None:
    """Qwen2-VL's M-RoPE bands (t, h, w), from either config layout; None without M-RoPE."""
    for source in (cfg.get("rope_parameters"), cfg.get("rope_scaling")):
        if isinstance(source, dict) and source.get("mrope_section"):
            return [int(n) for n in source["mrope_section"]]
    return None
