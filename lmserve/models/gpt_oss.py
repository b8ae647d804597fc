"""gpt-oss (GptOssForCausalLM) on the Llama implementation: biased attention with a learned sink
per head, windowed and global layers alternating, YaRN RoPE; every MLP a mixture of experts with
a biased router (top-k logits, then their softmax) and biased experts whose activation is a
clamped SwiGLU.

HF stores a layer's experts stacked, gate and up interleaved column by column
(`gate_up_proj` [experts, hidden, 2 * inter]); they are split into FusedMoE's gate | up halves
at load. The released checkpoints hold the experts in MXFP4 (`*_blocks` + `*_scales`,
models/mxfp4.py), dequantized at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lmserve.layers.moe import ClampedSwiGLU, FusedMoE, Router, Routing, select_experts
from lmserve.models.moe import MoeForCausalLM
from lmserve.models.mxfp4 import dequantize_mxfp4

_MXFP4_RE = re.compile(r"(.*\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)")
_EXPERTS_RE = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?")


class GptOssMoeBlock(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, num_experts = cfg["hidden_size"], cfg["num_local_experts"]
        self.router = Router(hidden, num_experts, bias=True)
        activation = ClampedSwiGLU(
            float(cfg.get("swiglu_alpha", 1.702)), float(cfg.get("swiglu_limit", 7.0))
        )
        self.experts = FusedMoE(
            num_experts, hidden, cfg["intermediate_size"], bias=True, activation=activation
        )
        self.routing = Routing(cfg["num_experts_per_tok"], False, softmax_after_topk=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.router(x), self.routing)
        return self.experts(x, weights, ids)


class GptOssForCausalLM(MoeForCausalLM):
    @staticmethod
    def moe_block(cfg: dict[str, Any], layer: int) -> nn.Module:
        return GptOssMoeBlock(cfg)  # every layer's MLP is sparse

    def _load_experts(
        self, weights: Iterable[tuple[str, torch.Tensor]], loaded: set[str]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Load experts (de-interleaving gate | up) and sinks, recording them in `loaded`; pass
        every other tensor on."""
        params = dict(self.named_parameters())
        for name, tensor in _mxfp4_dequantized(weights):
            experts = _EXPERTS_RE.fullmatch(name)
            if name.endswith(".self_attn.sinks"):
                target = name.replace(".self_attn.sinks", ".self_attn.attn.sinks")
            elif experts:
                is_gate_up, is_bias = experts[2] == "gate_up_proj", experts[3] is not None
                target = f"{experts[1]}.{('b' if is_bias else 'w') + ('13' if is_gate_up else '2')}"
                if is_gate_up:  # columns alternate gate, up: gather each half
                    tensor = torch.cat([tensor[..., 0::2], tensor[..., 1::2]], dim=-1)
                if not is_bias:  # HF's [experts, in, out] to FusedMoE's [experts, out, in]
                    tensor = tensor.transpose(1, 2)
            else:
                yield name, tensor
                continue
            param = params[target]
            if param.shape != tensor.shape:
                raise ValueError(
                    f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor)
            loaded.add(target)


def _mxfp4_dequantized(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The released checkpoints' MXFP4 experts (`*_proj_blocks` with `*_proj_scales`) as the
    bf16 checkpoints name and lay them out ([experts, in, out]); every other tensor as it is."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        packed = _MXFP4_RE.fullmatch(name)
        if packed is None:
            yield name, tensor
            continue
        parts = pending.setdefault(packed[1], {})
        parts[packed[2]] = tensor
        if len(parts) == 2:
            del pending[packed[1]]
            yield packed[1], dequantize_mxfp4(parts["blocks"], parts["scales"]).transpose(1, 2)
    if pending:
        raise ValueError(f"MXFP4 tensors without their blocks or scales: {sorted(pending)}")
