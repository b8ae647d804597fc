"""Whisper's audio encoder: 80 (or 128) log-mel channels x 3000 frames (30 s) in, 1500 hidden
states out, run once per request window; the decoder's cross-attention reads its output.

Two GELU convolutions (the second halves the frames), learned positions, pre-LayerNorm
transformer layers with bidirectional attention, a final LayerNorm: HF's WhisperEncoder in fp32
(exact erf GELU), without dropout or layer drop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.bidirectional_attention import BidirectionalAttention
from lmserve.models.weights import copy_named


class WhisperEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d_model = cfg["d_model"]
        self.self_attn = BidirectionalAttention(
            d_model, cfg["encoder_attention_heads"], k_bias=False
        )
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, cfg["encoder_ffn_dim"])
        self.fc2 = nn.Linear(cfg["encoder_ffn_dim"], d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, frames, d_model]."""
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d_model = cfg["d_model"]
        self.conv1 = nn.Conv1d(cfg["num_mel_bins"], d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(cfg["max_source_positions"], d_model)
        self.layers = nn.ModuleList(WhisperEncoderLayer(cfg) for _ in range(cfg["encoder_layers"]))
        self.layer_norm = nn.LayerNorm(d_model)
        self.num_frames = 2 * cfg["max_source_positions"]  # mel frames in one window

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[batch, mel bins, 3000] -> [batch, 1500, d_model]."""
        if features.shape[-1] != self.num_frames:
            raise ValueError(
                f"Whisper reads windows of {self.num_frames} mel frames, got {features.shape[-1]}"
            )
        x = F.gelu(self.conv2(F.gelu(self.conv1(features)))).transpose(1, 2)
        x = x + self.embed_positions.weight
        for layer in self.layers:
            x = layer(x)
        return self.layer_norm(x)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names under `model.encoder.`; other tensors are the caller's."""
        return copy_named(self, ((n.removeprefix("model.encoder."), t) for n, t in weights))
