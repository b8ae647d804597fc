"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): the windowed vision tower, and a Qwen2
language model that reads each image's merged rows in place of its `<|image_pad|>` tokens and
places tokens with M-RoPE.

M-RoPE gives every token three position components (time, row, column): text tokens have all
three equal, an image's rows have the image's grid positions, offset to follow the text before
them, and the text after an image resumes past the image's larger side. A request's prompt
positions are computed once from its images (`rope_positions`); every later token is at its
index plus the prompt's offset. The language model is ours, as for LLaVA.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lmserve.models.llama import LlamaForCausalLM
from lmserve.models.qwen2_5_vl_vision import Qwen2_5_VisionTower
from lmserve.models.vision_language import VisionLanguageModel

if TYPE_CHECKING:
    from lmserve.engine.messages import ImageInput


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    """`cfg` is the config with the text model's keys at the top (engine args flatten it)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        vision = cfg["vision_config"]
        self.merge = vision.get("spatial_merge_size", 2)
        self.image_token_id = int(cfg.get("image_token_id", cfg.get("image_token_index")))
        self.visual = Qwen2_5_VisionTower(vision)
        # a Qwen2 language model: biases on q/k/v, none on o
        text = {k: v for k, v in cfg.items() if k != "attention_bias"}
        self.language_model = LlamaForCausalLM({**text, "model_type": "qwen2"})

    @property
    def image_tokens(self) -> int:
        """Rows of a large image (1,280 for 1008x1120 pixels): an encoder-cache size hint."""
        return 1280

    def embed_images(self, patches: torch.Tensor) -> torch.Tensor:
        """[images, frames, height, width, patch values] (one grid) -> [images, rows, hidden]."""
        return self.visual(patches)

    def rope_positions(
        self, num_tokens: int, images: Sequence[ImageInput]
    ) -> tuple[np.ndarray, int]:
        """The prompt's M-RoPE positions [3, num_tokens] and the offset of every later token
        (HF's get_rope_index for images)."""
        positions = np.empty((3, num_tokens), dtype=np.int64)
        start = current = 0
        for image in sorted(images, key=lambda i: i.offset):
            text = image.offset - start
            positions[:, start : image.offset] = current + np.arange(text)
            current += text
            frames, height, width = (
                image.shape[0],
                image.shape[1] // self.merge,
                image.shape[2] // self.merge,
            )
            t, h, w = np.meshgrid(
                np.arange(frames), np.arange(height), np.arange(width), indexing="ij"
            )
            grid = np.stack([t.ravel(), h.ravel(), w.ravel()]) + current
            positions[:, image.offset : image.offset + image.length] = grid
            current += max(height, width)
            start = image.offset + image.length
        positions[:, start:] = current + np.arange(num_tokens - start)
        return positions, int(positions.max()) + 1 - num_tokens

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Either checkpoint layout: `visual.*` / `model.*` / `lm_head.*` (Qwen's own, and
        transformers 4) or `model.visual.*` / `model.language_model.*` / `lm_head.*` (5)."""
        visual: list[tuple[str, torch.Tensor]] = []

        def language(
            items: Iterable[tuple[str, torch.Tensor]],
        ) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in items:
                name = name.removeprefix("model.") if name.startswith("model.visual.") else name
                if name.startswith("visual."):
                    visual.append((name.removeprefix("visual."), tensor))
                elif name.startswith("model.language_model."):
                    yield "model." + name.removeprefix("model.language_model."), tensor
                else:
                    yield name, tensor

        loaded = {
            f"language_model.{n}" for n in self.language_model.load_weights(language(weights))
        }
        return loaded | {f"visual.{n}" for n in self.visual.load_weights(visual)}
