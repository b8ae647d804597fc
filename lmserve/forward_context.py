"""The one scoped global: attention metadata for the forward pass that is running right now.

Attention layers read it instead of having metadata threaded through every module's forward().
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_attn_metadata: ContextVar[Any] = ContextVar("lmserve_attn_metadata")


@contextmanager
def set_forward_context(attn_metadata: Any) -> Iterator[None]:
    token = _attn_metadata.set(attn_metadata)
    try:
        yield
    finally:
        _attn_metadata.reset(token)


def get_attn_metadata() -> Any:
    try:
        return _attn_metadata.get()
    except LookupError:
        raise RuntimeError("attention ran outside set_forward_context()") from None
