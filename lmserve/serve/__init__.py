"""lmserve on Ray Serve: `LLMConfig`, `build_openai_app`, `build_llm_deployment`.

The only package that imports Ray; it is an optional extra (`pip install 'lmserve[ray]'`).
"""

from __future__ import annotations

try:
    import ray  # noqa: F401
    from ray import serve  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised where Ray is absent
    raise ImportError("lmserve.serve needs Ray Serve: pip install 'lmserve[ray]'") from exc

from lmserve.serve.builders import build_llm_deployment, build_openai_app
from lmserve.serve.config import LLMConfig, LLMServingArgs, LoraConfig, ModelLoadingConfig

__all__ = [
    "LLMConfig",
    "LLMServingArgs",
    "LoraConfig",
    "ModelLoadingConfig",
    "build_llm_deployment",
    "build_openai_app",
]
