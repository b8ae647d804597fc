"""Load the model directory's tokenizer (fast tokenizers only: streaming detokenization needs one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizer.json) version")
    return tokenizer
