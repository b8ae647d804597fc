"""llguidance: the second backend. Slower masks than xgrammar, but it refuses JSON-schema
keywords it cannot enforce, takes Lark grammars and custom whitespace patterns."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import torch

from lmserve.structured_output.backend import GrammarBackend, Matcher
from lmserve.structured_output.spec import MAX_JSON_WHITESPACE, GrammarSpec, closed_objects

_BOUNDED_WHITESPACE = rf"[\x20\x0A\x0D\x09]{{0,{MAX_JSON_WHITESPACE}}}"


def _grammar(spec: GrammarSpec) -> str:
    if spec.kind == "json":
        options = {"whitespace_pattern": spec.whitespace_pattern or _BOUNDED_WHITESPACE}
        schema = closed_objects(spec.schema)
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
    if spec.whitespace_pattern is not None:
        raise ValueError("whitespace_pattern applies to JSON constraints only")
    if spec.kind == "choice":
        return llguidance.grammar_from("choice", json.loads(spec.text))
    if spec.kind == "structural_tag":
        raise ValueError("structural tags are enforced by the xgrammar backend only")
    # "grammar" takes Lark or GBNF (`root ::= ...`)
    return llguidance.grammar_from("regex" if spec.kind == "regex" else "grammar", spec.text)


class GuidanceMatcher(Matcher):
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_id: int | None) -> None:
        self._matcher = matcher
        self._eos_token_id = eos_token_id
        self._accepted_eos = False

    def accept(self, token_id: int) -> bool:
        self._accepted_eos = token_id == self._eos_token_id
        return self._matcher.consume_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)

    def is_terminated(self) -> bool:
        # NOTE: llguidance stops as soon as the grammar is complete ("}" of a JSON object);
        # like xgrammar's, our grammars end with the stop token, which the mask then forces.
        return self._accepted_eos and self._matcher.is_stopped()


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, vocab_size)

    @staticmethod
    def check(spec: GrammarSpec) -> None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(_grammar(spec))
        if is_error:
            raise ValueError(messages[0])

    def compile(self, spec: GrammarSpec) -> str:
        # llguidance compiles when a matcher is made; the grammar text is what is shared
        return _grammar(spec)

    def matcher(self, compiled: str) -> Matcher:
        matcher = llguidance.LLMatcher(self._tokenizer, compiled, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return GuidanceMatcher(matcher, self.tokenizer.eos_token_id)
