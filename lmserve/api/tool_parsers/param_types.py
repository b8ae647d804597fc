"""Typing a parameter value that a model wrote as bare text (Qwen3-Coder's XML calls) by the
JSON schema of the tool's parameter, as vLLM's `qwen3_coder` / `qwen3_xml` parsers do."""

from __future__ import annotations

import ast
import json
from typing import Any

_NOT_PARSED = object()


def parameter_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{function name: {parameter name: schema}} from OpenAI tool dicts; malformed entries are
    skipped (their values are then typed as for an unknown tool)."""
    schemas: dict[str, dict[str, Any]] = {}
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, dict) else None
        schemas[function["name"]] = properties if isinstance(properties, dict) else {}
    return schemas


def schema_types(schema: Any) -> list[str]:
    """The JSON types a schema allows, from `type` (a name or a list) and `anyOf` / `oneOf`."""
    if not isinstance(schema, dict):
        return []
    declared = schema.get("type")
    types = [declared] if isinstance(declared, str) else list(declared or [])
    for key in ("anyOf", "oneOf"):
        for option in schema.get(key) or []:
            types += schema_types(option)
    return [t for t in types if isinstance(t, str)]


def is_string(schema: Any) -> bool:
    """Whether the value is a string (or null) whatever its text: then it can be streamed."""
    types = set(schema_types(schema))
    return "string" in types and types <= {"string", "null"}


def typed_value(text: str, schema: Any) -> Any:
    """The value of `text` (already stripped of its framing newlines) for `schema`: `null`
    (any case) is None; otherwise the first declared type the text reads as, strings last; with
    no usable type, JSON if the text is JSON, else the text."""
    if text.lower() == "null":
        return None
    types = schema_types(schema)
    for declared in types:
        value = _as_type(text, declared)
        if value is not _NOT_PARSED:
            return value
    if "string" in types:
        return text
    value = _json(text)
    return text if value is _NOT_PARSED else value


def _as_type(text: str, declared: str) -> Any:
    stripped = text.strip()
    if declared == "integer":
        value = _json(stripped)
        return value if type(value) is int else _NOT_PARSED
    if declared == "number":
        value = _json(stripped)
        return value if type(value) in (int, float) else _NOT_PARSED
    if declared == "boolean":
        return {"true": True, "false": False}.get(stripped.lower(), _NOT_PARSED)
    if declared in ("object", "array"):
        value = _json(stripped)
        if value is _NOT_PARSED:
            try:
                value = ast.literal_eval(stripped)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return _NOT_PARSED
        wanted = dict if declared == "object" else list
        return value if isinstance(value, wanted) else _NOT_PARSED
    return _NOT_PARSED


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(text: str) -> Any:
    """Strict JSON (no NaN or Infinity), or _NOT_PARSED."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return _NOT_PARSED
