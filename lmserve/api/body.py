"""What a request body may hold, checked once at the edge before any model validates it.

JSON can carry what nothing downstream can represent: lone UTF-16 surrogates (`"\\ud800"`),
which the tokenizer and every encoder reject; integers past 64 bits, which the engine wire
cannot carry; `NaN`/`Infinity`, which are not JSON; nesting deep enough to exhaust recursion.
Each is a 400 that names the field here, instead of a 500 (or a dead stream) wherever it
would first be touched.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lmserve.api.errors import APIError

MAX_DEPTH = 64  # arrays and objects inside one another; deeper bodies are refused
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse(raw: bytes) -> Any:
    """The JSON value of a request body; APIError (400) naming what is wrong with it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(
            f"The request body is not valid UTF-8 (byte {exc.start}): send JSON in UTF-8"
        ) from None
    try:
        value = json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise APIError(_too_deep("the body")) from None
    except ValueError as exc:
        raise APIError(f"The request body is not valid JSON: {exc}") from None
    check(value)
    return value


async def parse_form(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body as a dict: an uploaded file's bytes, a text field's text, a
    repeated field (`name[]` as OpenAI's clients send lists) a list; APIError (400) when it is
    not a form."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not content_type.startswith("multipart/form-data"):
        sent = content_type or "no content type"
        raise APIError(f"This endpoint takes multipart/form-data (a file upload), not {sent}")

    async def chunks() -> Any:
        yield raw
        yield b""

    try:
        form = await MultiPartParser(Headers({"content-type": content_type}), chunks()).parse()
    except MultiPartException as exc:
        raise APIError(f"The form body is malformed: {exc.message}") from None
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        item = await value.read() if isinstance(value, UploadFile) else value
        if isinstance(value, UploadFile):
            await value.close()
        key = name.removesuffix("[]")
        if name.endswith("[]"):
            fields.setdefault(key, []).append(item)
        else:
            fields[key] = item
    check({k: v for k, v in fields.items() if not isinstance(v, bytes)})
    return fields


def check(value: Any) -> None:
    """Raise APIError naming the first field that holds what cannot be represented."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                raise _bad(path, "holds a lone UTF-16 surrogate, which is not text")
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int):
            if not _INT_MIN <= item <= _INT_MAX:
                raise _bad(path, "is an integer beyond 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise _bad(path, "is not a finite number")
        elif isinstance(item, list):
            if len(path) >= MAX_DEPTH:
                raise APIError(_too_deep(_name(path)), param=_name(path))
            if all(type(x) is int for x in item):  # token ids: the common long list
                if item and not (min(item) >= _INT_MIN and max(item) <= _INT_MAX):
                    raise _bad(path, "holds an integer beyond 64 bits")
                continue
            stack.extend((x, (*path, i)) for i, x in enumerate(item))
        elif isinstance(item, dict):
            if len(path) >= MAX_DEPTH:
                raise APIError(_too_deep(_name(path)), param=_name(path))
            for key, x in item.items():
                if not key.isascii() and _SURROGATE.search(key):
                    raise _bad(path, "has a key holding a lone UTF-16 surrogate")
                stack.append((x, (*path, key)))


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def _name(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "body"


def _bad(path: tuple[str | int, ...], what: str) -> APIError:
    name = _name(path)
    return APIError(f"{name} {what}", param=None if not path else name)


def _too_deep(where: str) -> str:
    return f"{where} is nested more than {MAX_DEPTH} levels deep"
