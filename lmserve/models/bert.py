"""BERT (`BertModel`, the encoder under sentence-transformers' MiniLM/BGE/E5 embedders), and
RoBERTa / XLM-R, which differ in where positions start: encoder-only transformers with
bidirectional attention, and their sequence-classification heads (cross-encoders).

It runs on packed prompts, as the engine schedules them: `input_ids`/`positions` hold every
prompt's tokens back to back (no padding through the linear layers); only attention looks at
prompts one by one (layers/packed_attention.py). Numerics follow HF's
eager BertModel in fp32 (exact erf GELU, LayerNorm after each residual).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmserve.layers.packed_attention import PackedLayout, packed_attention
from lmserve.models.weights import copy_named
from lmserve.pooling.score import num_labels

_ROBERTA_TYPES = ("roberta", "xlm-roberta")


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], hidden)
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type_embeddings = nn.Embedding(cfg.get("type_vocab_size", 2), hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=cfg.get("layer_norm_eps", 1e-12))
        # RoBERTa / XLM-R count positions from after their padding id (HF's
        # create_position_ids_from_input_ids on unpadded input)
        self.position_offset = (
            cfg.get("pad_token_id", 1) + 1 if cfg.get("model_type") in _ROBERTA_TYPES else 0
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(positions + self.position_offset))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        q, k, v = (
            proj(x).view(x.shape[0], self.num_heads, self.head_dim)
            for proj in (self.query, self.key, self.value)
        )
        return packed_attention(q, k, v, layout).reshape(x.shape)


class BertLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.attention = nn.Module()
        self.attention.self = BertSelfAttention(cfg)
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, cfg["intermediate_size"])
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg["intermediate_size"], hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"BERT with hidden_act {cfg['hidden_act']!r} is not supported")

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        attention = self.attention
        attended = attention.output.dense(attention.self(x, layout))
        x = attention.output.LayerNorm(attended + x)
        inner = F.gelu(self.intermediate.dense(x))
        return self.output.LayerNorm(self.output.dense(inner) + x)


class BertModel(nn.Module):
    """forward() returns the last hidden state of every packed token; the pooler reduces it."""

    is_encoder_only = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, positions, token_type_ids)
        layout = PackedLayout(seq_lens, x.device)
        for layer in self.encoder.layer:
            x = layer(x, layout)
        return x

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names, with or without the `bert.` / `roberta.` prefix of a task model; the
        unused pooler head and position-id buffer are skipped."""
        named = ((n.removeprefix("bert.").removeprefix("roberta."), t) for n, t in weights)
        return copy_named(
            self,
            (
                (n, t)
                for n, t in named
                if not (n.startswith("pooler.") or n.endswith("position_ids"))
            ),
        )

    def tie_weights(self) -> None:
        """Nothing is tied (the loader calls this after dummy weights)."""


class BertForSequenceClassification(nn.Module):
    """BERT with HF's classification head: CLS token -> dense + tanh (BERT's pooler) ->
    classifier. The pooling runner takes the CLS row; classify() is the head. Cross-encoders
    (rerankers) are this model with one label, fed a sentence pair."""

    is_encoder_only = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        hidden = cfg["hidden_size"]
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_labels(cfg))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.bert(input_ids, positions, seq_lens, token_type_ids)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """[prompts, H] CLS rows -> [prompts, num_labels] logits."""
        return self.classifier(torch.tanh(self.pooler.dense(pooled)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _load_classifier(self, "bert", ("pooler.", "classifier."), weights)

    def tie_weights(self) -> None:
        """Nothing is tied (the loader calls this after dummy weights)."""


class RobertaForSequenceClassification(nn.Module):
    """RoBERTa / XLM-R with HF's classification head (the rerankers BGE and mxbai are XLM-R):
    the first token -> dense + tanh -> out_proj; no BERT pooler."""

    is_encoder_only = True

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.config = cfg
        self.roberta = BertModel(cfg)
        hidden = cfg["hidden_size"]
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(hidden, hidden)
        self.classifier.out_proj = nn.Linear(hidden, num_labels(cfg))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: list[int],
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.roberta(input_ids, positions, seq_lens, token_type_ids)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(pooled)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return _load_classifier(self, "roberta", ("classifier.",), weights)

    def tie_weights(self) -> None:
        """Nothing is tied (the loader calls this after dummy weights)."""


def _load_classifier(
    model: nn.Module,
    encoder: str,
    head: tuple[str, ...],
    weights: Iterable[tuple[str, torch.Tensor]],
) -> set[str]:
    """A classifier's checkpoint: the head's tensors (named `head`, after the encoder's
    prefix) into `model`, the rest into its BertModel `model.<encoder>`."""
    head_weights: list[tuple[str, torch.Tensor]] = []
    encoder_weights: list[tuple[str, torch.Tensor]] = []
    for name, tensor in weights:
        bare = name.removeprefix(f"{encoder}.")
        if bare.startswith(head):
            head_weights.append((bare, tensor))
        else:
            encoder_weights.append((name, tensor))
    loaded = {f"{encoder}.{n}" for n in getattr(model, encoder).load_weights(encoder_weights)}
    return loaded | copy_named(model, head_weights)
