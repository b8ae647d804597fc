"""The W3C trace context headers of the HTTP request being answered, for the engine to parent
its span on. A context variable: each request's task sees its own, as the forward context does
for a model step; nothing is set where no client sent one."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

TRACE_HEADERS = ("traceparent", "tracestate")

_headers: ContextVar[dict[str, str] | None] = ContextVar("lmserve_trace_headers", default=None)


@contextmanager
def trace_context(headers: Mapping[str, str]) -> Iterator[None]:
    """While answering a request: its trace headers (if it sent any) for the engine."""
    found = {name: headers[name] for name in TRACE_HEADERS if name in headers}
    token = _headers.set(found or None)
    try:
        yield
    finally:
        _headers.reset(token)


def current_trace_headers() -> dict[str, str] | None:
    return _headers.get()
