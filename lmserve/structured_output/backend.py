"""The backend interface, the registry, and the frontend's choice of backend for a constraint."""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import torch

from lmserve.sampling_params import StructuredOutputsParams
from lmserve.structured_output.spec import XGRAMMAR_SLOW, GrammarSpec, keywords_used

_BACKENDS = {
    "xgrammar": "lmserve.structured_output.xgrammar_backend:XGrammarBackend",
    "guidance": "lmserve.structured_output.guidance_backend:GuidanceBackend",
}
# xgrammar's C++ errors start with a timestamp and source location
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class Matcher(ABC):
    """One request's position in its grammar."""

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into `bitmask[row]` (bit t of word w: token 32w+t)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True once the grammar is complete and its stop token was accepted."""


class GrammarBackend(ABC):
    """Compiles specs against one tokenizer's vocabulary; one instance per engine core."""

    name: str

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size

    @staticmethod
    @abstractmethod
    def check(spec: GrammarSpec) -> None:
        """Raise ValueError unless this backend can parse and fully enforce `spec`. Needs no
        tokenizer, so the frontend can answer a bad request with a 400 at once."""

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar, shared by every request with an equal spec (slow: off the loop)."""

    @abstractmethod
    def matcher(self, compiled: Any) -> Matcher:
        """A fresh matcher at the start of a compiled grammar."""


def backend_class(name: str) -> type[GrammarBackend]:
    module, _, attr = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def resolve_backend(params: StructuredOutputsParams, configured: str) -> StructuredOutputsParams:
    """`params` with the backend that will enforce it: the configured one, or with "auto" xgrammar
    unless it cannot enforce the constraint (or would be slow at it), then llguidance.
    ValueError says why none can."""
    spec = GrammarSpec.from_params(params)
    choice = params.backend or configured
    if choice != "auto" and choice not in _BACKENDS:
        raise ValueError(
            f"unknown structured outputs backend {choice!r}; use auto, xgrammar or guidance"
        )
    names = [choice]
    if choice == "auto":
        names = ["xgrammar", "guidance"]
        if spec.kind == "json" and keywords_used(spec.schema, XGRAMMAR_SLOW):
            names.reverse()
    reasons = []
    for name in names:
        try:
            backend_class(name).check(spec)
        except ValueError as exc:
            reasons.append(f"{name}: {clean_error(exc)}")
            continue
        return replace(params, backend=name)
    raise ValueError(f"invalid {params.kind} constraint ({'; '.join(reasons)})")


def clean_error(exc: Exception) -> str:
    text = str(exc).strip()
    return _CPP_PREFIX.sub("", text).strip()
