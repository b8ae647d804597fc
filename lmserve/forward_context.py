"""The scoped globals of the forward pass that is running right now: attention metadata and the
step's LoRA token groups.

Attention and LoRA layers read them instead of having them threaded through every module's
forward().
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_attn_metadata: ContextVar[Any] = ContextVar("lmserve_attn_metadata")
_lora_mapping: ContextVar[Any] = ContextVar("lmserve_lora_mapping", default=None)


@contextmanager
def set_forward_context(attn_metadata: Any, lora_mapping: Any = None) -> Iterator[None]:
    token = _attn_metadata.set(attn_metadata)
    lora_token = _lora_mapping.set(lora_mapping)
    try:
        yield
    finally:
        _lora_mapping.reset(lora_token)
        _attn_metadata.reset(token)


def get_attn_metadata() -> Any:
    try:
        return _attn_metadata.get()
    except LookupError:
        raise RuntimeError("attention ran outside set_forward_context()") from None


def get_lora_mapping() -> Any:
    """The step's LoRAMapping, or None when no request in it uses an adapter."""
    return _lora_mapping.get()
