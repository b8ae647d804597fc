"""The model's own sampling defaults (generation_config.json), as vLLM's `--generation-config auto`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def load_sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling fields the model's authors set; {} when there is no generation_config.json."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return {k: config[k] for k in SAMPLING_DEFAULT_KEYS if config.get(k) is not None}
