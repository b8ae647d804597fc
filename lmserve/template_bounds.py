"""Bounds on a chat template that came with a request, which is code a client runs on the
server: its time, the memory it grows the process by, and the size one operation may build.

Time and growth are watched line by line while it renders (`within`); a single operation that
would build a huge value at once (`'x' * 10**10`, `'%9999999999s'`, `center(10**10)`) allocates
before any line event, so `check` first renders the template in a Jinja sandbox that refuses
such operations before they run.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any, TypeVar

from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_BUILT = 4 * 2**20  # characters (or items) one operation of a request's template may build
_MAX_POW_BITS = 64 * 1024
_NUMBER = re.compile(r"\d+")

T = TypeVar("T")


class TemplateBoundError(ValueError):
    """A request's template went past a bound; the message says which."""


def within(seconds: float, work: Callable[[], T], max_growth_mb: int = 512) -> T:
    """`work()`, stopped once it has run `seconds` or grown the process by `max_growth_mb`: a
    trace function checks the clock and the resident size on every line the (compiled Jinja)
    template runs in this thread, so a template that loops for ever, or doubles a string step
    by step, is stopped before it holds the server."""
    deadline = time.monotonic() + seconds
    with open("/proc/self/statm", "rb", buffering=0) as statm:
        page = os.sysconf("SC_PAGE_SIZE")
        start = _resident(statm.fileno(), page)
        limit = max_growth_mb * 2**20

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if time.monotonic() > deadline:
                raise TemplateBoundError(f"the chat template did not finish within {seconds:g} s")
            if _resident(statm.fileno(), page) - start > limit:
                raise TemplateBoundError(
                    f"the chat template used more than {max_growth_mb} MB of memory"
                )
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            return work()
        finally:
            sys.settrace(previous)


def _resident(fd: int, page: int) -> int:
    """The process's resident bytes (statm's second field, in pages)."""
    return int(os.pread(fd, 64, 0).split()[1]) * page


def check(template: str, context: Mapping[str, Any]) -> None:
    """Render `template` with `context` in the bounded sandbox: TemplateBoundError if it asks
    for an operation past the bounds. Its other failures are left to the real render, which
    reports them."""
    env = _BoundedSandbox()
    try:
        env.from_string(template).render(**context)
    except TemplateBoundError:
        raise
    except Exception:  # noqa: BLE001 - not a bound: the real render says what is wrong
        return


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox (as HF renders in), with every operator, call and filter that
    can build a large value from small inputs checked before it runs."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        self.filters = {name: _checked(f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise
        self.globals["strftime_now"] = time.strftime

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and _is_int(times):
                    _check_size(len(seq) * times)
        elif operator == "**" and _is_int(left) and _is_int(right) and abs(left) > 1:
            if right * abs(left).bit_length() > _MAX_POW_BITS:
                raise TemplateBoundError(f"the chat template computes {left} ** {right}: too large")
        elif operator == "%" and isinstance(left, str):
            _check_numbers(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        _check_args(args, kwargs)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Jinja's hook on `str.format` / `format_map`: the format string is checked first."""
        if isinstance(getattr(value, "__self__", None), str):
            _check_numbers(value.__self__)
        return super().wrap_str_format(value)


def _checked(jinja_filter: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose arguments are checked first (Jinja's pass_* marks are kept)."""

    @functools.wraps(jinja_filter)
    def run(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        for arg in args:
            if isinstance(arg, str) and "%" in arg:  # the format filter's spec
                _check_numbers(arg)
        return jinja_filter(*args, **kwargs)

    return run


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if _is_int(value):
            _check_size(value)


def _check_numbers(spec: str) -> None:
    """A format string's widths and precisions (any number in it) within the bound."""
    for number in _NUMBER.findall(spec):
        if len(number) > 8:
            _check_size(10 ** len(number))
        _check_size(int(number))


def _check_size(size: int) -> None:
    if size > MAX_BUILT:
        raise TemplateBoundError(
            f"the chat template builds a value of {size} characters or items; a request's "
            f"template may build at most {MAX_BUILT} at once"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _raise(message: str) -> None:
    raise ValueError(message)
