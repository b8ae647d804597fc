"""The worker's adapters: which adapter sits in which slot of the LoRA layers, and which are
kept loaded in host memory.

The scheduler lets at most `max_loras` adapters run at once, so an adapter that needs a slot
always finds one that no running request uses.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from lmserve.config import LoRAConfig, ModelConfig
from lmserve.layers.gguf_layers import GGUFLinear
from lmserve.layers.int8_linear import Int8Linear
from lmserve.layers.linear import Linear
from lmserve.layers.tensor_parallel import TensorParallel, column_slice
from lmserve.lora.adapter import Adapter, load_adapter, read_adapter_config
from lmserve.lora.layers import LoRALinear
from lmserve.lora.request import LoRARequest

# the projections whose input a tensor-parallel rank holds a slice of (their partial sums are
# all-reduced, the LoRA delta's with them); the others' output rows are split
_ROW_PARALLEL = {"o_proj", "down_proj"}

# our fused module -> the HF projections it holds, in output order
_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def wrap_lora_layers(
    model: nn.Module, lora: LoRAConfig
) -> dict[tuple[int, str], tuple[LoRALinear, int]]:
    """Put every decoder linear layer of a Llama-family model behind a LoRALinear; returns
    (layer, HF projection) -> (its LoRALinear, part index)."""
    if not getattr(model, "supports_lora", True):
        architecture = (model.config.get("architectures") or [type(model).__name__])[0]
        raise ValueError(
            f"LoRA adapters are not supported for {architecture} (a mixture-of-experts model) "
            "yet; serve it without --enable-lora"
        )
    index = {}
    for i, layer in enumerate(model.model.layers):
        for owner in (layer.self_attn, layer.mlp):
            for name, parts in _PARTS.items():
                base = getattr(owner, name, None)
                if not isinstance(base, (Linear, Int8Linear, GGUFLinear)):
                    continue
                sizes = _part_sizes(owner, name, base.out_features)
                wrapped = LoRALinear(
                    base, base.in_features, sizes, lora.max_loras, lora.max_lora_rank
                )
                setattr(owner, name, wrapped)
                for part, hf_name in enumerate(parts):
                    index[(i, hf_name)] = (wrapped, part)
    return index


def _part_sizes(owner: nn.Module, name: str, out_features: int) -> list[int]:
    if name == "qkv_proj":
        return [owner.q_size, owner.kv_size, owner.kv_size]
    if name == "gate_up_proj":
        return [owner.intermediate_size] * 2
    return [out_features]


class LoRAManager:
    def __init__(self, model: nn.Module, model_config: ModelConfig, lora: LoRAConfig) -> None:
        self.model_config = model_config
        self.config = lora
        self.tp: TensorParallel | None = getattr(model, "tp", None)
        self.layers = wrap_lora_layers(model, lora)
        self.modules = {module for module, _ in self.layers.values()}
        self._slot_of: dict[int, int] = {}  # lora_int_id -> slot
        self._free_slots = list(range(lora.max_loras - 1, -1, -1))
        self._loaded: OrderedDict[int, Adapter] = OrderedDict()  # host-memory LRU

    def slot_of(self, lora_int_id: int) -> int:
        return self._slot_of[lora_int_id]

    def activate(self, request: LoRARequest, in_use: set[int]) -> int:
        """The slot holding `request`'s adapter, loading it (into a slot no id in `in_use` holds)
        when it is not there yet."""
        slot = self._slot_of.get(request.lora_int_id)
        if slot is not None:
            return slot
        adapter = self._host_copy(request)  # first: an adapter that fails to load takes no slot
        if not self._free_slots:
            victim = next(i for i in self._slot_of if i not in in_use)
            self._free_slots.append(self._slot_of.pop(victim))
        slot = self._free_slots.pop()
        for module in self.modules:
            module.clear(slot)
        for (layer, target), (a, b) in adapter.weights.items():
            module, part = self.layers[(layer, target)]
            if self.tp is not None:
                a, b = self._rank_slice(module, part, target, a, b)
            module.set_part(slot, part, a, b, adapter.config.scaling)
        self._slot_of[request.lora_int_id] = slot
        return slot

    def _rank_slice(
        self, module: LoRALinear, part: int, target: str, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of one projection's A [r, in] and B [out, r], split as the base
        layer is: a row-parallel one's input columns of A, a column-parallel one's rows of B."""
        assert self.tp is not None
        if target in _ROW_PARALLEL:
            width = module.lora_a.shape[1]
            return a.narrow(1, self.tp.rank * width, width), b
        size = module.part_sizes[part]
        return a, b.narrow(0, column_slice(self.tp, b.shape[0], size), size)

    def _host_copy(self, request: LoRARequest) -> Adapter:
        adapter = self._loaded.pop(request.lora_int_id, None)
        if adapter is None:
            config = read_adapter_config(
                request.lora_path, self.model_config, self.config.max_lora_rank
            )
            adapter = load_adapter(config)
        self._loaded[request.lora_int_id] = adapter
        while len(self._loaded) > (self.config.max_cpu_loras or self.config.max_loras):
            self._loaded.popitem(last=False)
        return adapter
