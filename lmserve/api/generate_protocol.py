"""POST /inference/v1/generate's body: vLLM's tokens-in, tokens-out request, for RL and agent
frameworks that tokenize themselves and must get back exactly the ids the model sampled."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmserve.api.protocol import MAX_N, StreamOptions
from lmserve.sampling_params import SamplingParams


class GenerateSamplingParams(BaseModel):
    """vLLM's SamplingParams as JSON: its names and defaults (max_tokens unset: as many as the
    context holds)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = 0
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=-1)
    prompt_logprobs: int | None = Field(default=None, ge=-1)
    logprob_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True  # accepted: the answer is token ids either way


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    request_id: str | None = None
    token_ids: list[int] = Field(min_length=1)
    sampling_params: GenerateSamplingParams = Field(default_factory=GenerateSamplingParams)
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    priority: int = 0
    kv_transfer_params: dict[str, Any] | None = None  # accepted; no KV is transferred

    def engine_params(self, max_tokens: int) -> SamplingParams:
        fields = self.sampling_params.model_dump(exclude={"detokenize", "max_tokens"})
        return SamplingParams(**fields, max_tokens=self.sampling_params.max_tokens or max_tokens)
