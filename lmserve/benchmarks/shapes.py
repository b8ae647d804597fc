"""Benchmark shapes shipped with lmserve: real models' config.json files (no weights), for
`--load-format dummy` runs at a large model's real size (`configs/<name>/config.json`).

A shape has no tokenizer (none can be downloaded), so it is served from a cached copy of its
config beside a placeholder tokenizer over the model's whole vocabulary: token i is the word
`t<i>` and words split at whitespace. Random weights then serve text like any model, and a
benchmark prompt of n such words is exactly n tokens (`lmserve bench serve --tokenizer <shape>`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHAPES_DIR = Path(__file__).parent / "configs"


def shape_names() -> list[str]:
    """The shipped shapes' names, sorted, for `--help` texts."""
    return sorted((path.name for path in SHAPES_DIR.iterdir() if path.is_dir()), key=str.lower)


def resolve_model(model: str | None, cache_dir: Path | None = None) -> str | None:
    """A shipped shape's served directory for its name (`Llama-3-8B`, case-insensitive), unless
    a local path of that name exists; anything else unchanged."""
    if model is None or Path(model).exists():
        return model
    for path in SHAPES_DIR.iterdir():
        if path.name.lower() == model.lower():
            if cache_dir is None:
                from lmserve.config import default_cache_dir

                cache_dir = default_cache_dir()
            return str(with_placeholder_tokenizer(path, cache_dir / "shapes" / path.name))
    return model


def with_placeholder_tokenizer(config_dir: Path, target: Path) -> Path:
    """`target` holding config_dir's config.json and the placeholder tokenizer for its
    vocabulary; written once (atomically, so concurrent processes may race) and reused."""
    config_text = (config_dir / "config.json").read_text()
    config = json.loads(config_text)
    special = {"unk_token": "t0"}
    for name in ("bos", "eos"):
        token_id = config.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            special[f"{name}_token"] = f"t{token_id}"
    tokenizer_config = json.dumps({"tokenizer_class": "TokenizersBackend", **special}, indent=2)
    written = {"tokenizer_config.json": tokenizer_config, "config.json": config_text}
    extra = config_dir / "preprocessor_config.json"  # a vision model's image processor
    if extra.exists():
        written = {extra.name: extra.read_text(), **written}
    if all(_read(target / name) == text for name, text in written.items()):
        return target
    from tokenizers import Tokenizer, models, pre_tokenizers

    size = config.get("vocab_size") or config["text_config"]["vocab_size"]
    vocab = {f"t{i}": i for i in range(size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    target.mkdir(parents=True, exist_ok=True)
    _write_atomically(target / "tokenizer.json", tokenizer.to_str())
    for name, text in written.items():  # config.json last: a complete copy has it
        _write_atomically(target / name, text)
    return target


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
