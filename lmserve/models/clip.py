"""CLIP's vision tower (LLaVA-1.5's image encoder): square images in, one hidden state per patch
(and the class token) out, from whichever layer the vision-language model reads.

Patch embedding by a strided convolution, a class token, learned positions, a LayerNorm before
the layers (CLIP's `pre_layrnorm`), pre-LayerNorm transformer layers with bidirectional
attention and quick-GELU MLPs: HF's CLIPVisionTransformer in fp32. The post-LayerNorm is
loaded (checkpoints carry it) but only applies when the last layer is asked for with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.layers.activation import activation
from lmserve.layers.bidirectional_attention import BidirectionalAttention
from lmserve.models.weights import copy_named


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5)
        self.self_attn = BidirectionalAttention(hidden, cfg["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(hidden, cfg["intermediate_size"])
        self.mlp.fc2 = nn.Linear(cfg["intermediate_size"], hidden)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.act = activation(cfg.get("hidden_act", "quick_gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [images, tokens, hidden]."""
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))


class CLIPVisionTower(nn.Module):
    """HF's CLIPVisionTransformer, by its parameter names."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch = cfg["hidden_size"], cfg["patch_size"]
        self.image_size = cfg["image_size"]
        num_positions = (self.image_size // patch) ** 2 + 1
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.empty(hidden))
        self.embeddings.patch_embedding = nn.Conv2d(
            cfg.get("num_channels", 3), hidden, kernel_size=patch, stride=patch, bias=False
        )
        self.embeddings.position_embedding = nn.Embedding(num_positions, hidden)
        eps = cfg.get("layer_norm_eps", 1e-5)
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            CLIPEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])
        )
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, pixel_values: torch.Tensor, feature_layer: int = -1) -> torch.Tensor:
        """[images, channels, size, size] -> [images, 1 + patches, hidden]: the hidden states
        after layer `feature_layer` (HF's `hidden_states[feature_layer]`: 0 is the embeddings,
        -1 the last layer's output, without the post-LayerNorm)."""
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"CLIP reads {self.image_size}x{self.image_size} images, got "
                f"{tuple(pixel_values.shape[-2:])}"
            )
        layers = self.encoder.layers
        stop = feature_layer % (len(layers) + 1)  # hidden_states has layers + 1 entries
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(pixel_values.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight
        x = self.pre_layrnorm(x)
        for layer in layers[:stop]:
            x = layer(x)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The tower's tensors by HF's names relative to it (`embeddings.*`, `encoder.*`, ...;
        older CLIPVisionModel files put them under `vision_model.`); a vision-language model
        strips its own prefix first."""
        return copy_named(
            self,
            (
                (name.removeprefix("vision_model."), tensor)
                for name, tensor in weights
                if not name.endswith("position_ids")
            ),
        )
