"""What a constraint compiles from: the user's StructuredOutputsParams normalised to one spec."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmserve.sampling_params import StructuredOutputsParams

# JSON whitespace allowed between tokens by default: enough for pretty printing a few levels
# deep, bounded so that a small model cannot loop on newlines.
MAX_JSON_WHITESPACE = 8

# JSON-schema keywords xgrammar accepts but does not enforce (checked here: a violating string
# is accepted). A schema using one must go to a backend that enforces it, or be refused.
XGRAMMAR_UNENFORCED = frozenset(
    {"not", "uniqueItems", "allOf", "if", "then", "else", "dependentSchemas"}
)
# String length bounds: xgrammar enforces them, but slowly (measured on a typical nested schema
# with maxLength on its strings, SmolLM2 vocabulary: compile 187 ms vs 13 ms without the bounds,
# mask fill 431 us a token on average vs 14 us); llguidance takes 2 ms and 93 us.
XGRAMMAR_SLOW = frozenset({"maxLength", "minLength"})
# Keys whose value maps names to subschemas (so its own keys are names, not keywords).
_NAME_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)


@dataclass(frozen=True)
class GrammarSpec:
    """A constraint in canonical text form; equal specs share one compiled grammar."""

    # "json" (a schema), "regex", "choice" (a JSON list), "grammar" (EBNF / Lark) or
    # "structural_tag" (xgrammar's, as JSON)
    kind: str
    text: str
    whitespace_pattern: str | None = None

    @classmethod
    def from_params(cls, params: StructuredOutputsParams) -> GrammarSpec:
        kind = params.kind
        if kind == "json":
            value = params.json
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            if not isinstance(value, dict | bool):
                raise ValueError("the JSON schema must be a JSON object")
            text = json.dumps(value)
        elif kind == "json_object":
            kind, text = "json", json.dumps({"type": "object"})
        elif kind == "choice":
            text = json.dumps(params.choice)
        elif kind == "structural_tag":
            try:
                tag = json.loads(params.structural_tag or "")
            except json.JSONDecodeError as exc:
                raise ValueError(f"the structural tag is not valid JSON: {exc}") from None
            if not isinstance(tag, dict):
                raise ValueError("the structural tag must be a JSON object")
            text = json.dumps(tag)
        else:
            text = getattr(params, kind)
        return cls(kind, text, params.whitespace_pattern)

    @property
    def schema(self) -> Any:
        return json.loads(self.text)


def keywords_used(schema: Any, keywords: frozenset[str]) -> set[str]:
    """The given keywords used anywhere in a schema's keyword positions."""
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key in keywords:
                found.add(key)
            if key in _NAME_MAPS and isinstance(value, dict):
                for sub in value.values():
                    found |= keywords_used(sub, keywords)
            elif key not in ("enum", "const", "default", "examples"):
                found |= keywords_used(value, keywords)
    elif isinstance(schema, list):
        for item in schema:
            found |= keywords_used(item, keywords)
    return found


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that sets no policy, as
    xgrammar's strict mode reads it: llguidance allows extra properties by default, and a small
    model then invents nested keys without end."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {}
    for key, value in schema.items():
        if key in _NAME_MAPS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "examples"):
            closed[key] = value
        else:
            closed[key] = closed_objects(value)
    if "properties" in schema and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed
