"""xgrammar: the default backend (fast masks: ~3 us a token with SmolLM2's vocabulary here)."""

from __future__ import annotations

import json
from typing import Any

import torch
import xgrammar as xgr

from lmserve.structured_output.backend import GrammarBackend, Matcher
from lmserve.structured_output.spec import (
    MAX_JSON_WHITESPACE,
    XGRAMMAR_UNENFORCED,
    GrammarSpec,
    keywords_used,
)


def _grammar(spec: GrammarSpec) -> xgr.Grammar:
    """Parse a spec into an xgrammar Grammar; raises on anything xgrammar cannot enforce."""
    if spec.whitespace_pattern is not None:
        raise ValueError("a custom whitespace_pattern is not supported")
    try:
        if spec.kind == "json":
            unenforced = keywords_used(spec.schema, XGRAMMAR_UNENFORCED)
            if unenforced:
                raise ValueError(f"it would ignore {', '.join(sorted(unenforced))}")
            return xgr.Grammar.from_json_schema(
                spec.text, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE
            )
        if spec.kind == "regex":
            return xgr.Grammar.from_regex(spec.text)
        if spec.kind == "choice":
            options = " | ".join(json.dumps(c) for c in json.loads(spec.text))
            return xgr.Grammar.from_ebnf(f"root ::= {options}")
        if spec.kind == "structural_tag":
            return _structural_tag(json.loads(spec.text))
        return xgr.Grammar.from_ebnf(spec.text)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def _structural_tag(tag: dict[str, Any]) -> xgr.Grammar:
    """Both forms vLLM takes: the older {structures: [{begin, schema, end}], triggers} (free
    text until a trigger, then the tag's schema), and xgrammar's {format: ...}."""
    if "structures" not in tag:
        return xgr.Grammar.from_structural_tag(json.dumps(tag))
    try:
        items = [
            xgr.StructuralTagItem(
                begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"]
            )
            for s in tag["structures"]
        ]
        triggers = list(tag["triggers"])
    except (KeyError, TypeError) as exc:
        raise ValueError(
            f"each of a structural tag's structures needs begin, schema and end, and the tag "
            f"its triggers ({exc!r})"
        ) from None
    return xgr.Grammar.from_structural_tag(items, triggers)


class XGrammarMatcher(Matcher):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        return self._matcher.accept_token(token_id)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        super().__init__(tokenizer, vocab_size)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=2)

    @staticmethod
    def check(spec: GrammarSpec) -> None:
        _grammar(spec)

    def compile(self, spec: GrammarSpec) -> xgr.CompiledGrammar:
        return self._compiler.compile_grammar(_grammar(spec))

    def matcher(self, compiled: xgr.CompiledGrammar) -> Matcher:
        return XGrammarMatcher(xgr.GrammarMatcher(compiled))
