"""The pooling endpoints' bodies: OpenAI's /v1/embeddings, and vLLM's /pooling, /classify,
/score and /rerank (Jina's and Cohere's rerank shapes), with vLLM's extras."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmserve.api.protocol import ChatMessage
from lmserve.pooling_params import PoolingParams

MAX_INPUTS = 2048  # OpenAI's bound on one request's inputs

Inputs = str | list[str] | list[int] | list[list[int]]


class PoolingBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # first N tokens; -1: context
    request_id: str | None = None
    priority: int = 0


class InputsRequest(PoolingBase):
    """`input` in OpenAI's four shapes, or (vLLM's) chat `messages` rendered by the model's
    chat template."""

    input: Inputs | None = None
    messages: list[ChatMessage] | None = None
    # with messages, as vLLM's embedding chat request
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    add_special_tokens: bool = False

    @model_validator(mode="after")
    def _one_of_input_or_messages(self) -> InputsRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("send either `input` or `messages`")
        return self

    def inputs(self) -> list[str | list[int]]:
        """OpenAI's four input shapes as a list of prompts (texts or token-id lists)."""
        given = self.input
        if given is None:
            return []
        if isinstance(given, str):
            return [given]
        if given and all(isinstance(x, int) for x in given):
            return [given]  # type: ignore[list-item]
        return list(given)  # type: ignore[arg-type]


class EmbeddingRequest(InputsRequest):
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    normalize: bool | None = None  # None: the model's pooler default

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(dimensions=self.dimensions, normalize=self.normalize)


class PoolingRequest(EmbeddingRequest):
    """vLLM's /pooling: the embeddings request, answered with the raw pooler output (nested
    lists for ALL pooling, class probabilities for a classifier)."""

    activation: bool | None = None

    def pooling_params(self) -> PoolingParams:
        return PoolingParams(
            dimensions=self.dimensions, normalize=self.normalize, activation=self.activation
        )


class _Activation(BaseModel):
    activation: bool | None = None  # False: raw logits
    use_activation: bool | None = None  # vLLM's newer name

    def pooling_params(self) -> PoolingParams:
        on = self.use_activation if self.use_activation is not None else self.activation
        return PoolingParams(activation=on)


class ClassificationRequest(_Activation, InputsRequest):
    pass


class ScoreRequest(_Activation, PoolingBase):
    text_1: str | list[str]
    text_2: str | list[str]


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="allow")  # Cohere's structured documents carry more fields

    text: str


class RerankRequest(_Activation, PoolingBase):
    query: str
    documents: list[str | RerankDocument]
    top_n: int = Field(default=0, ge=0)  # 0: every document
    return_documents: bool = True  # Cohere's; vLLM always returns them

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]
