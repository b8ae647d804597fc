"""Model resolution: the bundle by default and by its HF id, local paths, and clear misses."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmserve.config import default_cache_dir
from lmserve.models.source import DEFAULT_MODEL, resolve_model_dir


def test_default_and_its_hf_id_resolve_to_the_bundle(
    monkeypatch, tmp_path: Path, smollm2_dir
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    bundled = resolve_model_dir(None, default_cache_dir())
    assert bundled == smollm2_dir
    assert resolve_model_dir(DEFAULT_MODEL, default_cache_dir()) == bundled
    assert (bundled / "config.json").exists() and (bundled / "tokenizer.json").exists()


def test_local_directory_and_config_file(tiny_model_dirs) -> None:
    path = tiny_model_dirs["qwen2"]
    assert resolve_model_dir(str(path), default_cache_dir()) == path
    assert resolve_model_dir(str(path / "config.json"), default_cache_dir()) == path


def test_unknown_model_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not download models"):
        resolve_model_dir("nobody/no-such-model", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_dir(str(tmp_path / "empty"), tmp_path)
