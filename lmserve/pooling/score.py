"""vLLM's score semantics, shared by `LLM.score` and the /score and /rerank endpoints: how two
inputs pair up, and what a pooling model's score for a pair is."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lmserve.pooling.config import PoolingTask


def pair_up(first: str | Sequence[str], second: str | Sequence[str]) -> list[tuple[str, str]]:
    """One to one, one to many (`first` against each of `second`), or many to many pairwise
    (zip); `first` longer than one and of another length than `second` is an error."""
    firsts = [first] if isinstance(first, str) else list(first)
    seconds = [second] if isinstance(second, str) else list(second)
    if not firsts or not seconds:
        raise ValueError("text_1 and text_2 must not be empty")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise ValueError(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: send one text_1, or as "
            "many as text_2"
        )
    return list(zip(firsts, seconds, strict=True))


def num_labels(hf_config: dict[str, Any]) -> int:
    """HF's: `num_labels` when the config has it, else the size of `id2label` (default 2)."""
    labels = hf_config.get("num_labels") or len(hf_config.get("id2label") or [0, 1])
    return int(labels)


def labels(hf_config: dict[str, Any]) -> list[str]:
    """Label names by index, from `id2label` (HF's LABEL_i where it names none)."""
    names = hf_config.get("id2label") or {}
    return [
        str(names.get(str(i), names.get(i, f"LABEL_{i}"))) for i in range(num_labels(hf_config))
    ]


def check_scorable(task: PoolingTask, hf_config: dict[str, Any]) -> None:
    """A pair's score comes from a one-label classifier (a cross-encoder: the pair read
    together) or from an embedder (cosine of the two embeddings); nothing else scores."""
    if task == "classify" and num_labels(hf_config) != 1:
        raise ValueError(
            f"scoring needs a cross-encoder (a classifier with one label) or an embedding "
            f"model; this classifier has {num_labels(hf_config)} labels: use /classify"
        )


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
