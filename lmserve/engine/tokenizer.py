"""Load the model directory's tokenizer (fast tokenizers only: streaming detokenization needs one)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# What transformers saves for a plain tokenizer.json. AutoTokenizer would swap it for the model
# type's own class for some types (qwen2), which rebuilds the pipeline from the vocabulary; a
# directory declaring it (as the benchmark shapes' placeholder tokenizers do) gets its file as is.
_GENERIC_CLASS = "TokenizersBackend"


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if _declared_class(path) == _GENERIC_CLASS:
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizer.json) version")
    return tokenizer


def _declared_class(path: Path) -> str | None:
    config = Path(path) / "tokenizer_config.json"
    if not config.exists():
        return None
    return json.loads(config.read_text()).get("tokenizer_class")
