"""LLaVA (`LlavaForConditionalGeneration`: LLaVA-1.5, and Pixtral-12B as HF lays it out): a
CLIP or Pixtral vision tower, a two-layer projector, and a Llama-family language model that
reads the projected patches in place of the prompt's image placeholder tokens.

The language model is ours (`LlamaForCausalLM`, paged KV and all); an image's rows reach it as
prompt-position embeddings, the way a prompt given as embeddings does, so the runner decides
when an image is encoded (once, cached by its hash) and the language model stays unaware of
images. fp32 numerics equal HF's: the tower's hidden states at `vision_feature_layer`, the class
token dropped under the `default` strategy, linear -> activation -> linear.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lmserve.layers.activation import activation
from lmserve.models.clip import CLIPVisionTower
from lmserve.models.llama import LlamaForCausalLM
from lmserve.models.pixtral import PixtralVisionTower
from lmserve.models.vision_language import VisionLanguageModel
from lmserve.models.weights import copy_named

_TOWERS: dict[str, type[nn.Module]] = {
    "clip_vision_model": CLIPVisionTower,
    "pixtral": PixtralVisionTower,
}
# the outer model's parts, as checkpoints name them (transformers 5 nests them under `model.`)
_PARTS = ("language_model.", "vision_tower.", "multi_modal_projector.")


class LlavaProjector(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        vision_hidden = cfg["vision_config"]["hidden_size"]
        bias = bool(cfg.get("multimodal_projector_bias", True))
        self.linear_1 = nn.Linear(vision_hidden, cfg["hidden_size"], bias=bias)
        self.act = activation(cfg.get("projector_hidden_act", "gelu"))
        self.linear_2 = nn.Linear(cfg["hidden_size"], cfg["hidden_size"], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    """`cfg` is the config with the text model's keys at the top (engine args flatten it)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        vision = cfg["vision_config"]
        kind = vision.get("model_type", "clip_vision_model")
        if kind not in _TOWERS:
            raise ValueError(
                f"LLaVA with a {kind!r} vision tower is not supported ({', '.join(_TOWERS)} are)"
            )
        self.feature_layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(self.feature_layer, int):
            raise ValueError("LLaVA with several vision_feature_layer values is not supported")
        self.strategy = cfg.get("vision_feature_select_strategy", "default")
        if self.strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy {self.strategy!r} is not supported")
        self.image_token_id = int(cfg.get("image_token_id", cfg.get("image_token_index")))
        if kind == "pixtral" and self.strategy != "full":
            raise ValueError(
                "Pixtral's features are read whole: vision_feature_select_strategy 'full'"
            )
        self.vision_tower = _TOWERS[kind](vision)
        self.multi_modal_projector = LlavaProjector(cfg)
        self.language_model = LlamaForCausalLM(cfg)

    @property
    def image_tokens(self) -> int:
        """Embedding rows of the largest image."""
        patches = (self.vision_tower.image_size // self.config["vision_config"]["patch_size"]) ** 2
        return patches + (
            self.strategy == "full" and isinstance(self.vision_tower, CLIPVisionTower)
        )

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[images, 3, height, width] (one size) -> [images, rows, hidden]: each image's rows
        for the language model."""
        features = self.vision_tower(pixel_values, self.feature_layer)
        if self.strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Either checkpoint layout: `language_model.model.*` / `language_model.lm_head.*`
        (transformers 4) or `model.language_model.*` / `lm_head.*` (5). The language model's
        tensors stream into it; the tower's and projector's (small) are kept until it is done."""
        others: list[tuple[str, torch.Tensor]] = []

        def language(
            items: Iterable[tuple[str, torch.Tensor]],
        ) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                if name.startswith("model.") and name[6:].startswith(_PARTS):
                    name = name[6:]
                if name == "lm_head.weight" or name.startswith("language_model.lm_head."):
                    yield name.removeprefix("language_model."), tensor
                elif name.startswith("language_model."):
                    rest = name.removeprefix("language_model.")
                    yield rest if rest.startswith("model.") else f"model.{rest}", tensor
                else:
                    others.append((name, tensor))

        loaded = {
            f"language_model.{n}" for n in self.language_model.load_weights(language(weights))
        }
        tower = [
            (n.removeprefix("vision_tower."), t) for n, t in others if n.startswith("vision_tower.")
        ]
        projector = [
            (n.removeprefix("multi_modal_projector."), t)
            for n, t in others
            if n.startswith("multi_modal_projector.")
        ]
        unknown = [n for n, _ in others if not n.startswith(_PARTS)]
        if unknown:
            raise ValueError(f"checkpoint tensor {unknown[0]!r} has no place in LLaVA")
        loaded |= {f"vision_tower.{n}" for n in self.vision_tower.load_weights(tower)}
        loaded |= {
            f"multi_modal_projector.{n}" for n in copy_named(self.multi_modal_projector, projector)
        }
        return loaded
