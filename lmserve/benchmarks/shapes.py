"""Benchmark shapes shipped with lmserve: real models' config.json files (no weights), for
`--load-format dummy` runs at a large model's real size (`configs/<name>/config.json`)."""

from __future__ import annotations

from pathlib import Path

SHAPES_DIR = Path(__file__).parent / "configs"


def resolve_model(model: str | None) -> str | None:
    """A shipped shape's directory for its name (`Llama-3-8B`, case-insensitive), unless a local
    path of that name exists; anything else unchanged."""
    if model is None or Path(model).exists():
        return model
    for path in SHAPES_DIR.iterdir():
        if path.name.lower() == model.lower():
            return str(path)
    return model
