"""How a pooling model turns hidden states into its output: vLLM's --pooler-config, with its
defaults read from a sentence-transformers layout when the model directory has one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PoolingType = Literal["MEAN", "CLS", "LAST", "ALL"]
_ST_POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
               "pooling_mode_lasttoken": "LAST"}  # fmt: skip


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: PoolingType = "LAST"
    normalize: bool = True  # L2-normalize each embedding

    def __post_init__(self) -> None:
        if self.pooling_type not in ("MEAN", "CLS", "LAST", "ALL"):
            raise ValueError(
                f"pooling_type must be MEAN, CLS, LAST or ALL, got {self.pooling_type!r}"
            )


@dataclass(frozen=True)
class SentenceTransformersLayout:
    """What a sentence-transformers directory says: its pooling, whether it normalizes, and
    the longest input it embeds (sentence_bert_config's max_seq_length)."""

    pooler: PoolerConfig
    max_seq_length: int | None


def read_sentence_transformers(path: Path) -> SentenceTransformersLayout | None:
    """The layout of `path` (modules.json with a Pooling module), or None when it has none.
    A pooling mode lmserve does not have is an error that names it."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        return None
    pooling = json.loads((path / kinds["Pooling"]["path"] / "config.json").read_text())
    modes = [mode for key, mode in _ST_POOLING.items() if pooling.get(key)]
    unknown = [
        key for key, on in pooling.items() if key.startswith("pooling_mode") and on
        and key not in _ST_POOLING
    ]  # fmt: skip
    if unknown or len(modes) != 1:
        raise ValueError(
            f"{path}: sentence-transformers pooling {unknown or modes} is not supported; "
            "one of mean, cls or last-token pooling is"
        )
    bert_config = path / "sentence_bert_config.json"
    max_len = (
        json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.exists() else None
    )
    return SentenceTransformersLayout(PoolerConfig(modes[0], "Normalize" in kinds), max_len)  # type: ignore[arg-type]
