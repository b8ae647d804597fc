"""Prompts in, validated EngineCoreRequests out: tokenize, check limits, attach the stop token."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from lmserve.config import LoRAConfig, ModelConfig
from lmserve.engine.messages import EngineCoreRequest
from lmserve.lora.request import LoRARequest
from lmserve.sampling_params import SamplingParams, StructuredOutputsParams

# A prompt: text, or pre-tokenized {"prompt_token_ids": [...]} (optionally with "prompt" text).
PromptType = str | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]


class InputProcessor:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Any | None,
        structured_outputs_backend: str = "auto",
        lora_config: LoRAConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.lora_config = lora_config
        self._checked_adapters: set[LoRARequest] = set()  # already read and checked
        self.tokenizer = tokenizer
        self.structured_outputs_backend = structured_outputs_backend
        self.eos_token_id = _eos_token_id(model_config, tokenizer)

    def tokenize_prompt(
        self, prompt: PromptType, add_special_tokens: bool = True
    ) -> ProcessedPrompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.model_config.path} has no tokenizer; pass {{'prompt_token_ids': [...]}}"
                )
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            return ProcessedPrompt(prompt, list(ids))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return ProcessedPrompt(
                prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            )
        raise TypeError(
            f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}"
        )

    def make_requests(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[EngineCoreRequest]:
        """One engine request per sample: `n` > 1 becomes n requests with their own seeds, which
        share the prompt's KV blocks through the prefix cache."""
        if params.structured_outputs is not None:
            params = replace(params, structured_outputs=self._resolve_constraint(params))
        if lora_request is not None:
            self.check_lora(lora_request)
        if params.n == 1:
            return [self.make_request(request_id, prompt, params, cache_salt, lora_request)]
        return [
            self.make_request(
                f"{request_id}-{i}", prompt, params.for_child(i), cache_salt, lora_request
            )
            for i in range(params.n)
        ]

    def check_lora(self, lora_request: LoRARequest) -> None:
        """Read the adapter's config and tensor shapes once, so a bad adapter is the caller's
        error here and never fails inside the engine."""
        from lmserve.lora.adapter import read_adapter_config

        if self.lora_config is None:
            raise ValueError(
                f"LoRA adapter {lora_request.lora_name!r} asked for, but LoRA is off; start the "
                "engine with enable_lora=True (--enable-lora)"
            )
        if lora_request not in self._checked_adapters:
            read_adapter_config(
                lora_request.lora_path, self.model_config, self.lora_config.max_lora_rank
            )
            self._checked_adapters.add(lora_request)

    def make_request(
        self,
        req_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
    ) -> EngineCoreRequest:
        self._validate(prompt.prompt_token_ids, params)
        vocab = self.model_config.vocab_size
        if params.logprobs == -1 or params.prompt_logprobs == -1:  # -1: the whole vocabulary
            params = replace(
                params,
                logprobs=vocab if params.logprobs == -1 else params.logprobs,
                prompt_logprobs=vocab if params.prompt_logprobs == -1 else params.prompt_logprobs,
            )
        return EngineCoreRequest(
            req_id=req_id,
            prompt_token_ids=prompt.prompt_token_ids,
            sampling_params=params,
            eos_token_id=self.eos_token_id,
            arrival_time=time.time(),
            cache_salt=cache_salt,
            lora_request=lora_request,
        )

    def _resolve_constraint(self, params: SamplingParams) -> StructuredOutputsParams:
        """Check the output constraint now (a bad schema is the caller's error, not the core's)
        and pin the backend that will enforce it."""
        from lmserve.structured_output.backend import resolve_backend

        if self.tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer, and it has none")
        assert params.structured_outputs is not None
        return resolve_backend(params.structured_outputs, self.structured_outputs_backend)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        max_len = self.model_config.max_model_len
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty: it must have at least one token")
        if len(ids) > max_len:
            raise ValueError(
                f"the prompt is {len(ids)} tokens long, longer than the maximum model length of "
                f"{max_len}; shorten it or raise max_model_len"
            )
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(
                f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            limit = self.model_config.max_logprobs  # -1: no limit
            if value == -1:
                value = vocab
            if value is not None and limit != -1 and value > limit:
                raise ValueError(
                    f"{name} must be at most {limit} (--max-logprobs), got {value}"
                    + (" (-1 asks for the whole vocabulary)" if value == vocab else "")
                )
        bad = [
            t
            for t in [
                *(params.logit_bias or {}),
                *(params.stop_token_ids or []),
                *(params.logprob_token_ids or []),
            ]
            if not 0 <= t < vocab
        ]
        if bad:
            raise ValueError(
                f"token_id(s) {bad[:5]} in logit_bias/stop_token_ids contain out-of-vocab token "
                f"ids. Vocabulary size: {vocab}"
            )


def _eos_token_id(model_config: ModelConfig, tokenizer: Any | None) -> int | None:
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    eos = model_config.hf_config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos
