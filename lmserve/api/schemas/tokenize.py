"""POST /tokenize and /detokenize (vLLM's)."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class TokenizeResponse(msgspec.Struct, kw_only=True):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | UnsetType = UNSET  # return_token_strs


class DetokenizeResponse(msgspec.Struct, kw_only=True):
    prompt: str
