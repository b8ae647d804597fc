from __future__ import annotations

import pytest

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.spec import (
    XGRAMMAR_UNENFORCED,
    GrammarSpec,
    closed_objects,
    keywords_used,
)


def test_specs_are_canonical_and_hashable() -> None:
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}
    as_dict = GrammarSpec.from_params(StructuredOutputsParams(json=schema))
    as_text = GrammarSpec.from_params(
        StructuredOutputsParams(
            json='{"type": "object", "properties": {"b": {"type": "integer"}, "a": {}}}'
        )
    )
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert list(as_dict.schema["properties"]) == ["b", "a"]  # the schema's order is the output's
    json_object = GrammarSpec.from_params(StructuredOutputsParams(json_object=True))
    assert json_object.kind == "json" and json_object.schema == {"type": "object"}
    choice = GrammarSpec.from_params(StructuredOutputsParams(choice=["x", 'y"z']))
    assert choice.kind == "choice"


def test_bad_params_are_value_errors() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        GrammarSpec.from_params(StructuredOutputsParams(json="{nope"))


def test_keywords_are_found_in_keyword_positions_only() -> None:
    schema = {
        "type": "object",
        "properties": {
            "not": {"type": "string"},  # a property *named* not
            "tags": {"type": "array", "uniqueItems": True},
        },
        "$defs": {"x": {"allOf": [{"type": "integer"}]}},
        "enum": [{"not": 1}],
    }
    assert keywords_used(schema, XGRAMMAR_UNENFORCED) == {"uniqueItems", "allOf"}
    assert keywords_used({"type": "string"}, XGRAMMAR_UNENFORCED) == set()


def test_objects_are_closed_unless_the_schema_says_otherwise() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {}}},  # a property so named
            "open": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"d": {"properties": {"y": {}}}},
        "const": {"properties": {}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert closed["const"] == {"properties": {}}
