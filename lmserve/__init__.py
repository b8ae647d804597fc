"""lmserve: LLM inference and serving.

`from lmserve import LLM, SamplingParams` for offline batch inference.
"""

from lmserve.outputs import CompletionOutput, Logprob, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import BeamSearchParams, SamplingParams

__all__ = [
    "LLM",
    "BeamSearchParams",
    "CompletionOutput",
    "Logprob",
    "PoolingParams",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import lmserve` must not import torch
    if name == "LLM":
        from lmserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'lmserve' has no attribute {name!r}")
