"""Whisper (`WhisperForConditionalGeneration`) in the generate runner: speech in, text out.

The runner calls `encode()` once for each request the step starts (one 30 s window each): the
encoder runs, and every decoder layer's cross-attention K/V of its 1,500 states go into the
request's cross blocks in that layer's KV cache. Then `forward()` runs the decoder over the step's
tokens as a decoder-only model would: self-attention through the paged cache, cross-attention
over the blocks. HF's fp32 numerics: pre-LayerNorm layers, exact GELU, learned positions, the LM
head tied to the token embedding; the tokens HF's generate suppresses are masked in the logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.attention import Attention
from lmserve.layers.cross_attention import CrossBlocks, CrossLayout, cross_attention, store_cross
from lmserve.models.weights import copy_named
from lmserve.models.whisper_encoder import WhisperEncoder


class _Projections(nn.Module):
    """q/k/v/out as HF names them; k has no bias."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_heads, self.head_dim)


class WhisperSelfAttention(_Projections):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__(d_model, num_heads)
        self.attn = Attention(num_heads, num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self.heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(self.attn(q, k, v).reshape(x.shape))


class WhisperCrossAttention(_Projections):
    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, layout: CrossLayout) -> torch.Tensor:
        q = self.heads(self.q_proj(x))
        out = cross_attention(q, kv_cache, layout, self.head_dim**-0.5)
        return self.out_proj(out.reshape(x.shape))

    def store(self, states: torch.Tensor, kv_cache: torch.Tensor, blocks: CrossBlocks) -> None:
        """K/V of one request's encoder states [states, d_model] into its cross blocks."""
        store_cross(
            kv_cache, self.heads(self.k_proj(states)), self.heads(self.v_proj(states)), blocks
        )


class WhisperDecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d_model, heads = cfg["d_model"], cfg["decoder_attention_heads"]
        self.self_attn = WhisperSelfAttention(d_model, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.encoder_attn = WhisperCrossAttention(d_model, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, cfg["decoder_ffn_dim"])
        self.fc2 = nn.Linear(cfg["decoder_ffn_dim"], d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, cross: CrossLayout) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        kv_cache = self.self_attn.attn.kv_cache  # the cross blocks live in the same cache
        assert kv_cache is not None
        x = x + self.encoder_attn(self.encoder_attn_layer_norm(x), kv_cache, cross)
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperDecoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d_model = cfg["d_model"]
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], d_model)
        self.embed_positions = nn.Embedding(cfg["max_target_positions"], d_model)
        self.layers = nn.ModuleList(WhisperDecoderLayer(cfg) for _ in range(cfg["decoder_layers"]))
        self.layer_norm = nn.LayerNorm(d_model)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cross: CrossLayout
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) + self.embed_positions(positions)
        for layer in self.layers:
            x = layer(x, cross)
        return self.layer_norm(x)


class WhisperModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(cfg)
        self.decoder = WhisperDecoder(cfg)


class WhisperForConditionalGeneration(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.model = WhisperModel(cfg)
        # HF's generate: suppress_tokens at every step, begin_suppress_tokens at the first one
        self.register_buffer(
            "suppress_ids", torch.tensor(cfg.get("suppress_tokens") or [], dtype=torch.long)
        )
        self.register_buffer(
            "begin_suppress_ids",
            torch.tensor(cfg.get("begin_suppress_tokens") or [], dtype=torch.long),
        )

    @torch.inference_mode()
    def encode(self, features: torch.Tensor, blocks: list[CrossBlocks]) -> None:
        """Run the encoder over windows [batch, mel bins, frames] and store each window's
        cross-attention K/V in every decoder layer, into `blocks[i]` for window i."""
        states = self.model.encoder(features)
        for layer in self.model.decoder.layers:
            kv_cache = layer.self_attn.attn.kv_cache
            assert kv_cache is not None, "the runner binds the KV caches before encoding"
            for window, request_blocks in zip(states, blocks, strict=True):
                layer.encoder_attn.store(window, kv_cache, request_blocks)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cross: CrossLayout
    ) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, cross)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw logits; process_logits() applies the decoding rules to the sampling rows."""
        return F.linear(hidden, self.model.decoder.embed_tokens.weight)

    def no_speech_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows] the probability of the no-speech token at start-of-transcript rows, from the
        raw logits, as Whisper (and HF's no-speech detection) reads it: high on silence."""
        no_speech = int(self.config.get("no_timestamps_token_id", 0)) - 1
        return torch.softmax(self.compute_logits(hidden).float(), dim=-1)[:, no_speech]

    def process_logits(
        self, logits: torch.Tensor, prompts: list[np.ndarray], outputs: list[np.ndarray]
    ) -> None:
        """HF generate's Whisper rules on the sampling rows, in its order: suppress_tokens,
        begin-suppress at the first output; then, for a row whose prompt has no <|notimestamps|>, the timestamp
        rules (timestamps in pairs and non-decreasing, the first one early, and a timestamp
        forced where the timestamps together outweigh every text token)."""
        logits[:, self.suppress_ids] = -torch.inf
        first = [i for i, out in enumerate(outputs) if not len(out)]
        if first and len(self.begin_suppress_ids):
            rows = torch.tensor(first, device=logits.device).unsqueeze(1)
            logits[rows, self.begin_suppress_ids] = -torch.inf
        no_stamps = self.config.get("no_timestamps_token_id")
        if no_stamps is None:
            return
        stamped = [i for i, prompt in enumerate(prompts) if no_stamps not in prompt]
        for i in stamped:
            self._timestamp_rules(logits[i], outputs[i].tolist(), no_stamps)
        if stamped:
            begin = no_stamps + 1
            rows = torch.tensor(stamped, device=logits.device)
            logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
            stamp = logprobs[:, begin:].logsumexp(dim=-1)
            text = logprobs[:, :begin].max(dim=-1).values
            forced = rows[stamp > text]
            logits[forced.unsqueeze(1), torch.arange(begin, device=logits.device)] = -torch.inf

    def _timestamp_rules(self, row: torch.Tensor, seq: list[int], no_stamps: int) -> None:
        begin, eos = no_stamps + 1, int(self.config["eos_token_id"])
        row[no_stamps] = -torch.inf
        last_was_stamp = bool(seq) and seq[-1] >= begin
        penultimate_was_stamp = len(seq) < 2 or seq[-2] >= begin
        if last_was_stamp:
            if penultimate_was_stamp:
                row[begin:] = -torch.inf  # a pair closed: text (or the end) follows
            else:
                row[:eos] = -torch.inf  # a segment's end: its closing timestamp or the end
        stamps = [t for t in seq if t >= begin]
        if stamps:
            lowest = stamps[-1] if last_was_stamp and not penultimate_was_stamp else stamps[-1] + 1
            row[begin:lowest] = -torch.inf
        if not seq:
            row[:begin] = -torch.inf
            max_initial = self.config.get("max_initial_timestamp_index")
            if max_initial is not None:
                row[begin + max_initial + 1 :] = -torch.inf

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.decoder.layers]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; the output projection is the token embedding (tied), never loaded."""
        return copy_named(self, ((n, t) for n, t in weights if n != "proj_out.weight"))

    def tie_weights(self) -> None:
        """The LM head reads the embedding itself: nothing to copy."""
