"""What every vision-language model here shares: a language model of ours (`language_model`)
that does the text work, image rows reaching it as prompt-position embeddings."""

from __future__ import annotations

import torch
from torch import nn

from lmserve.layers.attention import Attention
from lmserve.models.llama import LlamaForCausalLM


class VisionLanguageModel(nn.Module):
    """Subclasses set `language_model` and add their vision tower, `embed_images`,
    `image_tokens` and `load_weights`."""

    language_model: LlamaForCausalLM

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """`positions`: [num_tokens], or [3, num_tokens] for an M-RoPE model."""
        return self.language_model(input_ids, positions, embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def attention_layers(self) -> list[Attention]:
        return self.language_model.attention_layers()

    def tie_weights(self) -> None:
        self.language_model.tie_weights()
