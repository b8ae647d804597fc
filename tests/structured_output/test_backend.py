"""Which backend enforces a constraint, decided in the frontend with no tokenizer."""

from __future__ import annotations

import json

import pytest

from lmserve.sampling_params import StructuredOutputsParams as Params
from lmserve.structured_output.backend import resolve_backend

TAG = json.dumps({"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}})


@pytest.mark.parametrize(
    ("params", "backend"),
    [
        (Params(json={"type": "object", "properties": {"a": {"type": "integer"}}}), "xgrammar"),
        (Params(regex=r"\d{4}-\d{2}-\d{2}"), "xgrammar"),
        (Params(choice=["yes", "no"]), "xgrammar"),
        (Params(grammar='root ::= "a" | "b"'), "xgrammar"),
        (Params(json_object=True), "xgrammar"),
        (Params(structural_tag=TAG), "xgrammar"),  # only xgrammar has structural tags
        # xgrammar would silently ignore allOf; llguidance enforces it
        (Params(json={"allOf": [{"type": "object"}, {"required": ["a"]}]}), "guidance"),
        # only llguidance takes a custom whitespace pattern, or a Lark grammar
        (Params(json={"type": "object"}, whitespace_pattern=r"[ ]?"), "guidance"),
        (Params(grammar='start: "a" | "b"'), "guidance"),
        # string length bounds: llguidance first, for speed
        (Params(json={"type": "object", "properties": {"a": {"maxLength": 8}}}), "guidance"),
    ],
)
def test_auto_picks_a_backend_that_enforces_the_constraint(params: Params, backend: str) -> None:
    assert resolve_backend(params, "auto").backend == backend


@pytest.mark.parametrize(
    ("params", "configured", "needle"),
    [
        # neither backend enforces uniqueItems: refused, never silently dropped
        (Params(json={"type": "array", "uniqueItems": True}), "auto", "uniqueItems"),
        (Params(json={"not": {"type": "string"}}), "xgrammar", "not"),
        (Params(json={"type": 5}), "auto", "type"),
        (Params(regex="[a-"), "auto", "regex"),
        (Params(grammar="root ::= undefined_rule"), "auto", "undefined_rule"),
        (Params(json={"type": "object"}), "nope", "unknown structured outputs backend"),
        (Params(structural_tag=TAG), "guidance", "xgrammar backend only"),
        (Params(structural_tag="[1]"), "auto", "must be a JSON object"),
    ],
)
def test_constraints_no_backend_can_enforce_are_refused(
    params: Params, configured: str, needle: str
) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        resolve_backend(params, configured)
    assert "Check failed" not in str(info.value) and ".cc:" not in str(info.value)


def test_a_backend_asked_for_by_the_request_wins() -> None:
    params = Params(json={"type": "object"}, backend="guidance")
    assert resolve_backend(params, "xgrammar").backend == "guidance"
