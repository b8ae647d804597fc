"""Request bodies: every field of OpenAI's chat and completions requests plus vLLM's extras.

Unknown fields are rejected (400 naming the field) rather than silently ignored. OpenAI fields
that have no meaning here are accepted and logged; structured outputs and tools are refused until
they are implemented.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmserve.api.errors import APIError
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# OpenAI fields accepted but without effect on a local engine.
_IGNORED = (
    "metadata", "store", "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
    "web_search_options", "verbosity", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "safety_identifier", "moderation", "parallel_tool_calls",
    "best_of",
)  # fmt: skip
# Fields whose feature is not implemented yet: refused, never ignored.
_UNSUPPORTED = (
    "tools", "functions", "function_call", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_whitespace_pattern", "structured_outputs",
)  # fmt: skip


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingRequest(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = None
    request_id: str | None = None
    priority: int = 0
    return_token_ids: bool = False
    cache_salt: str | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    # OpenAI fields without effect here, and fields of features still to come
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    best_of: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    guided_whitespace_pattern: Any = None
    structured_outputs: Any = None

    def check_supported(self) -> None:
        for name in _UNSUPPORTED:
            if getattr(self, name, None) is not None:
                raise APIError(f"{name!r} is not supported yet", param=name)
        for name in _IGNORED:
            if getattr(self, name, None) is not None:
                logger.warning("ignoring %r: it has no effect on this server", name)

    def sampling_params(
        self, max_tokens: int | None, num_logprobs: int | None, defaults: dict[str, Any]
    ) -> SamplingParams:
        """Unset fields take the model's defaults (`defaults`, from generation_config.json with
        --generation-config auto), then vLLM's."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        try:
            return SamplingParams(
                n=self.n or 1,
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=pick("top_k", 0),
                min_p=pick("min_p", 0.0),
                seed=self.seed,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=pick("repetition_penalty", 1.0),
                logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos,
                logprobs=num_logprobs,
                prompt_logprobs=self.prompt_logprobs,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
            )
        except ValueError as exc:
            raise APIError(str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0)
    suffix: str | None = None
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError("'suffix' is not supported (no fill-in-the-middle)", param="suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    moderation: Any = None
    # vLLM extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise APIError(
                "response_format other than 'text' is not supported yet", param="response_format"
            )
        if self.tool_choice not in (None, "none"):
            raise APIError("'tool_choice' is not supported yet", param="tool_choice")
        if self.add_generation_prompt and self.continue_final_message:
            raise APIError(
                "continue_final_message and add_generation_prompt cannot both be true",
                param="continue_final_message",
            )


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]
