"""POST /v1/embeddings' body: OpenAI's fields, and vLLM's extras."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from lmserve.pooling_params import PoolingParams

MAX_INPUTS = 2048  # OpenAI's bound on one request's inputs


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # first N tokens; -1: context
    normalize: bool | None = None  # None: the model's pooler default
    request_id: str | None = None
    priority: int = 0

    def inputs(self) -> list[str | list[int]]:
        """OpenAI's four input shapes as a list of prompts (texts or token-id lists)."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if given and all(isinstance(x, int) for x in given):
            return [given]  # type: ignore[list-item]
        return list(given)  # type: ignore[arg-type]

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(dimensions=self.dimensions, normalize=self.normalize)
