"""Layers that run once per decoder layer and token batch skip nn.Module's call dispatch.

`module(x)` goes through `nn.Module.__call__`, which checks for hooks before it runs `forward`:
a few microseconds a call, and a Llama decode step makes ~10 such calls per layer. Measured on a
2-core EPYC, SmolLM2-135M with `-q gguf_q8` (~300 calls a step), four alternating runs of 4 x
256 decode steps each: 9.9 ms a step on average without the dispatch, 10.6 ms with it (0.4-1.1
ms less in every pair). The price: forward hooks registered on these modules do not run (the
model-level modules, LlamaModel and the *ForCausalLM classes, keep them).
"""

from __future__ import annotations

from typing import Any


class DirectCall:
    """Mixin, listed before nn.Module: calling the module runs its forward directly."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)  # type: ignore[attr-defined]
