"""POST /inference/v1/generate: token ids out, whole or streamed, with logprobs keyed by id."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from lmserve.api.schemas.chat import ChoiceLogprobs
from lmserve.api.schemas.common import PromptLogprobs, Usage


class GenerateChoice(msgspec.Struct, kw_only=True):
    index: int
    logprobs: ChoiceLogprobs | None  # tokens as "token_id:{id}": nothing is detokenized
    finish_reason: str | None
    token_ids: list[int]  # a stream's chunk: the new ones


class GenerateResponse(msgspec.Struct, kw_only=True):
    request_id: str
    created: int
    model: str
    choices: list[GenerateChoice]
    usage: Usage | UnsetType = UNSET  # a whole answer's; a stream's last chunk (include_usage)
    prompt_logprobs: PromptLogprobs | None | UnsetType = UNSET
    kv_transfer_params: dict[str, Any] | None | UnsetType = UNSET
