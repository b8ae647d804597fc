"""Gemma 2 and Gemma 3 (text) as one implementation.

Against the Llama family: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms (layers/norm.py's
GemmaRMSNorm), a norm after attention and after the MLP as well as before each, a GELU-tanh MLP,
queries scaled by query_pre_attn_scalar, and layers that alternate between a sliding window and
global attention, each kind with its own RoPE base (Gemma 3). Gemma 2 caps attention scores and
final logits with tanh; Gemma 3 normalizes q and k per head instead. Checkpoint names are HF's
and load through the Llama loader, q/k/v and gate/up fused the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmserve.layers.activation import activation
from lmserve.layers.attention import Attention
from lmserve.layers.direct_call import DirectCall
from lmserve.layers.embedding import uninitialized_embedding
from lmserve.layers.linear import Linear
from lmserve.layers.norm import GemmaRMSNorm
from lmserve.layers.rotary import RotaryEmbedding, apply_rotary
from lmserve.models.decode_layers import DecodeLoop, LayerParts
from lmserve.models.llama import LlamaForCausalLM

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(cfg: dict[str, Any]) -> list[str]:
    """Each layer's attention kind: the config's `layer_types`, else HF's default pattern (every
    2nd layer global for Gemma 2, every 6th for Gemma 3)."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    default = 2 if cfg.get("model_type") == "gemma2" else 6
    pattern = int(
        cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or default
    )
    return [SLIDING if (i + 1) % pattern else FULL for i in range(cfg["num_hidden_layers"])]


def rope_params(cfg: dict[str, Any], kind: str) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) of one layer kind, from either config layout: per-kind
    `rope_parameters` (transformers 5), or `rope_theta` / `rope_local_base_freq` /
    `rope_scaling` (4; the scaling applies to global layers only)."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(kind), dict):
        params = params[kind]
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(params["rope_theta"]), scaling
    if kind == SLIDING and cfg.get("rope_local_base_freq"):
        return float(cfg["rope_local_base_freq"]), None
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") if kind == FULL else None
    return theta, scaling or None


class GemmaAttention(DirectCall, nn.Module):
    def __init__(self, cfg: dict[str, Any], kind: str) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads") or self.num_heads
        self.head_dim = cfg.get("head_dim") or hidden // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = Linear(hidden, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden, bias=bias)
        self.qk_norm = cfg.get("model_type") != "gemma2"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, cfg["rms_norm_eps"])
            self.k_norm = GemmaRMSNorm(self.head_dim, cfg["rms_norm_eps"])
        self.kind = kind
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            float(cfg.get("query_pre_attn_scalar") or self.head_dim) ** -0.5,
            sliding_window=cfg["sliding_window"] if kind == SLIDING else None,
            soft_cap=cfg.get("attn_logit_softcapping"),
        )

    def forward(self, rope: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        else:  # rotated in place on CPU: not into the fused qkv output v is read from
            q, k = q.contiguous(), k.contiguous()
        out = self.attn(apply_rotary(q, rope), apply_rotary(k, rope), v)
        return self.o_proj(out.view(num_tokens, self.q_size))


class GemmaMLP(DirectCall, nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.intermediate_size = cfg["intermediate_size"]
        self.gate_up_proj = Linear(cfg["hidden_size"], 2 * self.intermediate_size)
        self.down_proj = Linear(self.intermediate_size, cfg["hidden_size"])
        self.activation_name = (
            cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        )
        self.act = activation(self.activation_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


class GemmaDecoderLayer(DirectCall, nn.Module):
    def __init__(self, cfg: dict[str, Any], kind: str) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.self_attn = GemmaAttention(cfg, kind)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.mlp = GemmaMLP(cfg)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(
        self, rope: tuple[torch.Tensor, ...], x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed MLP output, residual stream), the residual adds fused into the pre-norms as
        in the Llama layers."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(rope, x))
        x = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual

    def decode_parts(self, rope: int) -> LayerParts | None:
        """This layer's pieces for the one-call decode loop (models/decode_layers.py), `rope`
        its rotary table's number, or None where its MLP's activation is not GELU-tanh."""
        attn, mlp = self.self_attn, self.mlp
        if mlp.activation_name != "gelu_pytorch_tanh":
            return None
        norms = (
            self.input_layernorm,
            self.post_attention_layernorm,
            self.pre_feedforward_layernorm,
            self.post_feedforward_layernorm,
        )
        if attn.qk_norm:
            norms += (attn.q_norm, attn.k_norm)
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        return LayerParts(norms, linears, attn.attn, rope)


class GemmaModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        if cfg.get("use_bidirectional_attention"):
            raise ValueError(
                "use_bidirectional_attention (EmbeddingGemma) needs the pooling runner, which "
                "does not run Gemma yet"
            )
        hidden = cfg["hidden_size"]
        self.embed_tokens = uninitialized_embedding(cfg["vocab_size"], hidden)
        self.embed_scale = hidden**0.5  # rounded to the activation dtype, as HF does
        self.layer_types = layer_types(cfg)
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, kind) for kind in self.layer_types)
        self.norm = GemmaRMSNorm(hidden, cfg["rms_norm_eps"])
        head_dim = self.layers[0].self_attn.head_dim
        max_position = cfg.get("max_position_embeddings", 8192)
        self.rotary_emb = nn.ModuleDict(
            {
                kind: RotaryEmbedding(head_dim, max_position, *rope_params(cfg, kind))
                for kind in sorted(set(self.layer_types))
            }
        )
        # the decode step's layers in one C++ call, where they are ones it runs
        self.decode_loop = DecodeLoop(gemma=True)

    def _decode_parts(self) -> list[LayerParts | None]:
        kinds = list(self.rotary_emb)  # ropes are passed in this order
        return [
            layer.decode_parts(kinds.index(kind))
            for kind, layer in zip(self.layer_types, self.layers, strict=True)
        ]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if embeds is not None:  # prompt positions given as embeddings: (token indices, rows)
            x[embeds[0]] = embeds[1]
        ropes = {kind: rotary(positions, x.dtype) for kind, rotary in self.rotary_emb.items()}
        if embeds is None:
            out = self.decode_loop(self._decode_parts, x, list(ropes.values()))
            if out is not None:
                return self.norm(*out)
        residual = None
        for kind, layer in zip(self.layer_types, self.layers, strict=True):
            x, residual = layer(ropes[kind], x, residual)
        return self.norm(x, residual)


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM; the LM head (tied, as every Gemma's is) and the
    serving interface are the Llama one's, logits soft-capped where the config says so."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        cfg = {"tie_word_embeddings": True, **cfg}  # HF's default for Gemma
        super().__init__(cfg, GemmaModel(cfg))
        self.final_soft_cap = cfg.get("final_logit_softcapping")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        if self.final_soft_cap is not None:
            cap = self.final_soft_cap
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits
