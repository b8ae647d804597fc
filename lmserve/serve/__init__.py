"""lmserve on Ray Serve: `LLMConfig`, `build_openai_app`, `build_llm_deployment`, and the
deployments themselves (`LLMServer`, also as `VLLMService`, and `LLMRouter`).

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
from lmserve.serve.router import LLMRouter
from lmserve.serve.server import LLMServer, VLLMService

__all__ = [
    "LLMConfig",
    "LLMRouter",
    "LLMServer",
    "LLMServingArgs",
    "LoraConfig",
    "ModelLoadingConfig",
    "VLLMService",
    "build_llm_deployment",
    "build_openai_app",
]
