"""Request bodies: every field of OpenAI's chat and completions requests plus vLLM's extras.

Unknown fields are rejected (400 naming the field) rather than silently ignored. OpenAI fields
that have no meaning here are accepted and logged; the deprecated `functions` API is refused.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lmserve.api.errors import APIError
from lmserve.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

logger = logging.getLogger(__name__)

# OpenAI fields accepted but without effect on a local engine.
_IGNORED = (
    "metadata", "store", "service_tier", "modalities", "audio", "prediction", "reasoning_effort",
    "web_search_options", "verbosity", "prompt_cache_key", "prompt_cache_options",
    "prompt_cache_retention", "safety_identifier", "moderation", "parallel_tool_calls",
    "best_of", "kv_transfer_params",
)  # fmt: skip
# Fields whose feature is not implemented: refused, never ignored.
_UNSUPPORTED = ("functions", "function_call")
MAX_N = 128  # choices one request may ask for (OpenAI's bound on `n`)
MAX_STOP = 64  # stop strings one request may give


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` field: one constraint, and JSON's whitespace pattern."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    whitespace_pattern: str | None = None


class _SamplingRequest(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = Field(default=1, ge=1, le=MAX_N)
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
    prompt_logprobs: int | None = Field(default=None, ge=-1)  # -1: the whole vocabulary
    logprob_token_ids: list[int] | None = None  # these tokens' logprobs at each step
    request_id: str | None = None
    priority: int = 0
    return_token_ids: bool = False
    cache_salt: str | None = None
    stream_interval: int | None = Field(default=None, ge=1)  # at least the server's
    # keep the prompt's last N tokens (-1: as many as the context holds); "right" keeps the first
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] = "left"
    return_tokens_as_token_ids: bool | None = None  # this request's --return-tokens-as-token-ids
    # beam search: `n` beams, ranked by summed logprob over generated_length ** length_penalty
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # disaggregated prefill's KV hand-over (vLLM's connectors): accepted, no KV is transferred
    kv_transfer_params: dict[str, Any] | None = None
    # OpenAI fields without effect here, and fields of features still to come
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    # output constraints: OpenAI's response_format, vLLM's structured_outputs and guided_* fields
    response_format: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        bad = [key for key in bias or {} if not key.strip().lstrip("-").isdigit()]
        if bad:
            raise ValueError(f"keys must be token ids (integers as strings); not {bad[:5]}")
        return bias

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep_some(cls, keep: int | None) -> int | None:
        if keep == 0:
            raise ValueError("must be -1 (as many as the context holds) or at least 1")
        return keep

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stop)}")
        return stop

    def check_supported(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(
                "stream_options can only be given when stream is true", param="stream_options"
            )
        for name in _UNSUPPORTED:
            if getattr(self, name, None) is not None:
                raise APIError(f"{name!r} is not supported yet", param=name)
        for name in _IGNORED:
            if getattr(self, name, None) is not None:
                logger.warning("ignoring %r: it has no effect on this server", name)

    def beam_search_params(self, params: SamplingParams) -> BeamSearchParams:
        """With use_beam_search: `n` beams for `params`' max_tokens. What beam search would not
        honour (sampling's logprobs, stop strings, output constraints) is a 400, never
        silently dropped."""
        for name, given in (
            ("logprobs", params.logprobs is not None),
            ("prompt_logprobs", params.prompt_logprobs is not None),
            ("stop", bool(params.stop_strings) or bool(params.stop_token_ids)),
            ("structured_outputs", params.structured_outputs is not None),
            ("min_tokens", params.min_tokens > 0),
        ):
            if given:
                raise APIError(f"{name} cannot be combined with use_beam_search", param=name)
        assert params.max_tokens is not None
        return BeamSearchParams(
            beam_width=params.n,
            max_tokens=params.max_tokens,
            ignore_eos=params.ignore_eos,
            temperature=params.temperature,
            length_penalty=self.length_penalty,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def constraint(self) -> StructuredOutputsParams | None:
        """The one output constraint asked for, from whichever field carries it."""
        extra = (
            self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            if self.structured_outputs
            else {}
        )
        sources: list[tuple[str, str, Any]] = [  # (field, constraint kind, value)
            (f"guided_{kind}", kind, getattr(self, f"guided_{kind}"))
            for kind in ("json", "regex", "choice", "grammar")
        ]
        sources += [(f"structured_outputs.{k}", k, v) for k, v in extra.items()]
        if self.response_format is not None:
            sources += _response_format_constraint(self.response_format)
        given = [s for s in sources if s[1] != "whitespace_pattern" and s[2] not in (None, False)]
        whitespace = extra.get("whitespace_pattern", self.guided_whitespace_pattern)
        if len(given) > 1:
            names = ", ".join(source for source, _, _ in given)
            raise APIError(f"more than one output constraint ({names}); give only one")
        if not given:
            if whitespace is not None:
                raise APIError("a whitespace pattern needs a JSON constraint", param="guided_json")
            return None
        source, kind, value = given[0]
        try:
            return StructuredOutputsParams(**{kind: value}, whitespace_pattern=whitespace)
        except (TypeError, ValueError) as exc:
            raise APIError(f"{source}: {exc}", param=source) from None

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
                logprob_token_ids=self.logprob_token_ids,
                skip_special_tokens=self.skip_special_tokens,
                spaces_between_special_tokens=self.spaces_between_special_tokens,
                structured_outputs=self.constraint(),
            )
        except ValueError as exc:
            raise APIError(str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] | None = None
    # base64 of a torch.save'd [tokens, hidden_size] tensor, or several (--enable-prompt-embeds)
    prompt_embeds: str | list[str] | None = None
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=-1)  # -1: the whole vocabulary
    suffix: str | None = None
    add_special_tokens: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError("'suffix' is not supported (no fill-in-the-middle)", param="suffix")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionDefinition


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Tools as the chat template (and the tool parsers) take them; None for none."""
    return [tool.model_dump(exclude_none=True) for tool in tools or []] or None


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionName


_TOOL_CHOICES = ("none", "auto", "required")


def _response_format_constraint(response_format: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """OpenAI's response_format as (source, constraint kind, value); `text` is no constraint.
    `json_schema` may hold {"name", "schema", "strict"} or, as some clients send it, a bare schema."""
    kind = response_format.get("type")
    if kind == "text":
        return []
    if kind == "json_object":
        return [("response_format", "json_object", True)]
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(
                "response_format of type json_schema needs a 'json_schema' object",
                param="response_format",
            )
        schema = spec.get("schema", spec)
        return [("response_format", "json", schema)]
    if kind == "structural_tag":  # vLLM's: {structures, triggers}, or xgrammar's {format}
        return [("response_format", "structural_tag", json.dumps(response_format))]
    raise APIError(
        "response_format type must be text, json_object, json_schema or structural_tag, got "
        f"{kind!r}",
        param="response_format",
    )


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=-1)  # -1: the whole vocabulary
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = True
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
        if isinstance(self.tool_choice, str) and self.tool_choice not in _TOOL_CHOICES:
            raise APIError(
                f"tool_choice must be one of {', '.join(_TOOL_CHOICES)} or a named function, "
                f"got {self.tool_choice!r}",
                param="tool_choice",
            )
        if self.tool_choice not in (None, "none") and not self.tools:
            raise APIError("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise APIError(
                    f"tool_choice names {self.tool_choice.function.name!r}, which is not among "
                    f"the tools ({', '.join(names)})",
                    param="tool_choice",
                )
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
    tools: list[Tool] | None = None  # rendered into the chat, as a chat request would be
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


class LoadLoRAAdapterRequest(BaseModel):
    """POST /v1/load_lora_adapter: serve the PEFT adapter at `lora_path` as model `lora_name`."""

    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # accepted as vLLM does; the name identifies the adapter
