"""Linear layers with per-token LoRA deltas, for batches that mix adapters.

Each wrapped layer holds `max_loras` slots of stacked adapter weights. A fused projection
(q/k/v or gate/up) keeps one A column block and one B row block per part, so that part's delta
lands only in its own output columns: out += ((x @ A) @ B) * scaling, where A is [in, parts*R]
and B [parts*R, out] is block-diagonal. Ranks below R are zero-padded; zero terms add nothing.
The step's token -> slot groups come from the forward context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmserve.forward_context import get_lora_mapping
from lmserve.layers.direct_call import DirectCall


@dataclass(frozen=True)
class LoRAMapping:
    """One step's adapters: (slot, token rows) per adapter in use; rows None = every token."""

    groups: tuple[tuple[int, torch.Tensor | None], ...]


class LoRALinear(DirectCall, nn.Module):
    def __init__(
        self, base: nn.Module, in_features: int, part_sizes: list[int], slots: int, rank: int
    ) -> None:
        super().__init__()
        self.base = base
        self.part_sizes = part_sizes
        self.rank = rank
        out_features = sum(part_sizes)
        parts = len(part_sizes)
        # beside the base weights, in the activations' dtype (an int8 or GGUF base takes
        # float32 in; a GGUF one keeps its weights as parts, on the CPU)
        weight = getattr(base, "weight", None)
        kw = dict(device=torch.device("cpu"), dtype=torch.float32)
        if weight is not None:
            kw["device"] = weight.device
            if weight.is_floating_point():
                kw["dtype"] = weight.dtype
        self.register_buffer("lora_a", torch.zeros(slots, in_features, parts * rank, **kw))
        self.register_buffer("lora_b", torch.zeros(slots, parts * rank, out_features, **kw))
        self.register_buffer("scaling", torch.zeros(slots, **kw))

    def set_part(
        self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor, scaling: float
    ) -> None:
        """Load one part's A [r, in] and B [out_part, r] into `slot` (r <= the slot's rank)."""
        r = a.shape[0]
        start = sum(self.part_sizes[:part])
        cols = slice(part * self.rank, part * self.rank + r)
        self.lora_a[slot, :, cols] = a.t()
        self.lora_b[slot, cols, start : start + self.part_sizes[part]] = b.t()
        self.scaling[slot] = scaling

    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mapping = get_lora_mapping()
        if mapping is None:
            return out
        for slot, rows in mapping.groups:
            xs = x if rows is None else x.index_select(0, rows)
            delta = (xs @ self.lora_a[slot]) @ self.lora_b[slot]
            delta = delta * self.scaling[slot]
            if rows is None:
                out += delta
            else:
                out.index_add_(0, rows, delta)
        return out
