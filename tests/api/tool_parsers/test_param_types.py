from __future__ import annotations

from typing import Any

import pytest

from lmserve.api.tool_parsers.param_types import (
    is_string,
    parameter_schemas,
    schema_types,
    typed_value,
)


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [
        ("5", {"type": "integer"}, 5),
        ("5.0", {"type": "integer"}, 5.0),  # not an integer: read as JSON
        ("five", {"type": "integer"}, "five"),
        ("2.5", {"type": "number"}, 2.5),
        ("7", {"type": "number"}, 7),
        ("NaN", {"type": "number"}, "NaN"),
        ("True", {"type": "boolean"}, True),
        (" false ", {"type": "boolean"}, False),
        ('{"a": [1]}', {"type": "object"}, {"a": [1]}),
        ("{'a': None}", {"type": "object"}, {"a": None}),
        ("[1, 'x']", {"type": "array"}, [1, "x"]),
        ("[1]", {"type": "object"}, [1]),  # not an object: read as JSON
        ("007", {"type": "string"}, "007"),
        ("NULL", {"type": "string"}, None),
        ("3", {"type": ["string", "integer"]}, 3),
        ("x", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "x"),
        ("42", None, 42),
        ('"quoted"', None, "quoted"),
        ("plain words", None, "plain words"),
        ("", {"type": "string"}, ""),
    ],
)
def test_typed_value(text: str, schema: Any, value: Any) -> None:
    assert typed_value(text, schema) == value
    assert type(typed_value(text, schema)) is type(value)


def test_schema_types_and_is_string() -> None:
    assert schema_types({"type": ["string", "null"]}) == ["string", "null"]
    assert schema_types({"oneOf": [{"type": "integer"}, {"anyOf": [{"type": "null"}]}]}) == [
        "integer",
        "null",
    ]
    assert schema_types("string") == []
    assert is_string({"type": ["string", "null"]})
    assert not is_string({"type": ["string", "integer"]})
    assert not is_string(None)


def test_parameter_schemas_skip_malformed_tools() -> None:
    tools: list[Any] = [
        {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {}}}}},
        {"type": "function", "function": {"name": "g"}},
        {"type": "function", "function": {"description": "no name"}},
        "not a dict",
    ]
    assert parameter_schemas(tools) == {"f": {"a": {}}, "g": {}}
