"""Mixture-of-experts decoders on the Llama implementation: Mixtral, Qwen2-MoE (with its gated
shared expert) and Qwen3-MoE (q/k norms). Attention, norms, RoPE and the LM head are the Llama
family's; the MLP of each sparse layer is a router plus experts (layers/moe.py).

Checkpoints name experts one by one (`experts.{e}.w1`/`gate_proj`, ...; Mixtral's block is
`block_sparse_moe`) or, as transformers 5 may save them, stacked (`experts.gate_up_proj`);
both load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lmserve.layers.linear import Linear
from lmserve.layers.moe import FusedMoE, Router, Routing, select_experts
from lmserve.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel

# one expert's HF projection -> our part of FusedMoE
_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up"}
_EXPERT_PART |= {"w2": "down", "down_proj": "down"}
_EXPERT_RE = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight")
_STACKED_RE = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        num_experts = cfg.get("num_local_experts") or cfg["num_experts"]
        inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
        self.gate = Router(hidden, num_experts)
        self.experts = FusedMoE(num_experts, hidden, inter)
        renormalize = cfg.get("norm_topk_prob", cfg.get("model_type") == "mixtral")
        self.routing = Routing(cfg["num_experts_per_tok"], bool(renormalize))
        shared = cfg.get("shared_expert_intermediate_size")
        self.shared_expert = LlamaMLP(cfg, shared) if shared else None
        self.shared_expert_gate = Linear(hidden, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.routing)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            assert self.shared_expert_gate is not None
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def _is_sparse(cfg: dict[str, Any], layer: int) -> bool:
    """HF's rule: every `decoder_sparse_step`-th layer, unless listed in `mlp_only_layers`."""
    step = int(cfg.get("decoder_sparse_step") or 1)
    return layer not in (cfg.get("mlp_only_layers") or []) and (layer + 1) % step == 0


class MoeForCausalLM(LlamaForCausalLM):
    """MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM."""

    supports_lora = False  # adapters on expert weights are not implemented yet

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg, LlamaModel(cfg, lambda i: self.moe_block(cfg, i)))

    @staticmethod
    def moe_block(cfg: dict[str, Any], layer: int) -> nn.Module | None:
        """Layer `layer`'s MLP: the experts block, or None for the dense Llama MLP."""
        return SparseMoeBlock(cfg) if _is_sparse(cfg, layer) else None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        rest = super().load_weights(self._load_experts(weights, loaded))
        return loaded | rest

    def _load_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Load expert tensors into FusedMoE, recording its parameters in `loaded`; pass every
        other tensor on (Mixtral's `block_sparse_moe` renamed `mlp`)."""
        modules = dict(self.named_modules())
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            one, stacked = _EXPERT_RE.fullmatch(name), _STACKED_RE.fullmatch(name)
            if one and one[3] in _EXPERT_PART:
                part = _EXPERT_PART[one[3]]
                modules[one[1]].load_expert(int(one[2]), part, tensor)
                loaded.add(f"{one[1]}.{'w2' if part == 'down' else 'w13'}")
            elif stacked:
                kind = "down" if stacked[2] == "down_proj" else "gate_up"
                modules[stacked[1]].load_stacked(kind, tensor)
                loaded.add(f"{stacked[1]}.{'w2' if kind == 'down' else 'w13'}")
            else:
                yield name, tensor
