"""Prompts in, validated EngineCoreRequests out: tokenize, check limits, attach the stop token."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from typing import Any

from lmserve.config import DEFAULT_MM_LIMIT, LoRAConfig, ModelConfig
from lmserve.engine.messages import EncoderFeatures, EngineCoreRequest, ImageInput, PromptEmbeds
from lmserve.lora.request import LoRARequest
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams, StructuredOutputsParams

# A prompt: text, pre-tokenized {"prompt_token_ids": [...]} (optionally with "prompt" text), or
# embeddings {"prompt_embeds": a [tokens, hidden] tensor, or its torch.save bytes}; for a
# pooling model also a sentence pair, {"text": str, "text_pair": str} (cross-encoders); for a
# speech model {"multi_modal_data": {"audio": (samples, rate)}} with an optional decoder "prompt"
# (text with Whisper's special tokens) or "prompt_token_ids" (default: the tokenizer's prefix);
# for a vision-language model {"prompt": text with one image placeholder per image,
# "multi_modal_data": {"image": a PIL image or a list of them}} (the processor expands each
# placeholder), or "prompt_token_ids" with the placeholders already expanded.
PromptType = str | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    prompt_token_ids: list[int]  # for embeddings: placeholders, one per row
    prompt_embeds: PromptEmbeds | None = None
    token_type_ids: list[int] | None = None  # a sentence pair's segments, where the model has them
    encoder_features: EncoderFeatures | None = None  # a speech model's audio window
    images: tuple[ImageInput, ...] = ()  # a vision-language prompt's, in prompt order


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
        self._audio_features: Any | None = None  # WhisperFeatures, built on the first audio
        self._image_prompts: Any | None = None  # ImagePrompts, built on the first image

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
        if isinstance(prompt, dict) and "multi_modal_data" in prompt:
            data = prompt["multi_modal_data"]
            if isinstance(data, dict) and set(data) == {"image"}:
                return self._image_prompt(prompt, add_special_tokens)
            return self._audio_prompt(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return ProcessedPrompt(
                prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            )
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            embeds = self._prompt_embeds(prompt["prompt_embeds"])
            return ProcessedPrompt(None, [0] * embeds.num_tokens, embeds)
        raise TypeError(
            "a prompt is a string, {'prompt_token_ids': [...]} or {'prompt_embeds': tensor}, "
            f"got {type(prompt).__name__}"
        )

    def tokenize_truncated(self, prompt: PromptType, keep: int | None) -> ProcessedPrompt:
        """A prompt cut to its first `keep` tokens (-1: the context), special tokens kept (the
        tokenizer's own truncation, as sentence-transformers truncates); None: uncut."""
        if isinstance(prompt, dict) and "text_pair" in prompt:
            return self.tokenize_pair(prompt["text"], prompt["text_pair"], keep)
        keep = self._keep(keep)
        if keep is None:
            return self.tokenize_prompt(prompt)
        if isinstance(prompt, str) and self.tokenizer is not None:
            ids = self.tokenizer(prompt, truncation=True, max_length=keep)["input_ids"]
            return ProcessedPrompt(prompt, list(ids))
        processed = self.tokenize_prompt(prompt)
        return replace(processed, prompt_token_ids=processed.prompt_token_ids[:keep])

    def _keep(self, keep: int | None) -> int | None:
        """truncate_prompt_tokens as a token count: -1 is the context, None no cut."""
        if keep == -1:
            return self.model_config.max_model_len
        if keep is not None and keep < 1:
            raise ValueError(f"truncate_prompt_tokens must be -1 or at least 1, got {keep}")
        return keep

    def tokenize_many(self, prompts: list[PromptType], keep: int | None) -> list[ProcessedPrompt]:
        """tokenize_truncated over many prompts, the texts in one batched tokenizer call (its
        Rust side splits them across threads: 1,000 sentences took 0.29 s one by one)."""
        texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
        if self.tokenizer is None or len(texts) < 2:
            return [self.tokenize_truncated(p, keep) for p in prompts]
        keep = self._keep(keep)
        cut = {"truncation": True, "max_length": keep} if keep is not None else {}
        ids = self.tokenizer([prompts[i] for i in texts], **cut)["input_ids"]
        done = dict(zip(texts, ids, strict=True))
        return [
            ProcessedPrompt(p, list(done[i])) if i in done else self.tokenize_truncated(p, keep)
            for i, p in enumerate(prompts)
        ]

    def tokenize_pair(self, first: str, second: str, keep: int | None) -> ProcessedPrompt:
        """A sentence pair as a cross-encoder reads it: the tokenizer's pair encoding (BERT:
        [CLS] first [SEP] second [SEP], with segment ids), cut to `keep` tokens (-1: the
        context) longest-first, as sentence-transformers' CrossEncoder cuts it."""
        if self.tokenizer is None:
            raise ValueError(f"{self.model_config.path} has no tokenizer to pair texts with")
        keep = self._keep(keep)
        cut = {"truncation": True, "max_length": keep} if keep is not None else {}
        encoded = self.tokenizer(first, second, **cut)
        types = encoded.get("token_type_ids")
        uses_types = self.model_config.hf_config.get("type_vocab_size", 0) > 1
        return ProcessedPrompt(
            None,
            list(encoded["input_ids"]),
            token_type_ids=list(types) if types and uses_types else None,
        )

    def _audio_prompt(self, prompt: dict[str, Any]) -> ProcessedPrompt:
        """A speech model's request: the audio window's features, and the decoder prompt."""
        import numpy as np

        from lmserve.audio.decode import SAMPLE_RATE, resample

        data = prompt["multi_modal_data"]
        if not isinstance(data, dict) or set(data) != {"audio"}:
            raise ValueError("multi_modal_data takes one key, 'audio': (samples, sample_rate)")
        if not self.model_config.num_encoder_tokens:
            raise ValueError(f"{self.model_config.model} takes no audio: it is a text model")
        if self.model_config.limit_mm_per_prompt.get("audio", DEFAULT_MM_LIMIT) < 1:
            raise ValueError("audio is off on this server (--limit-mm-per-prompt)")
        audio = data["audio"]
        samples, rate = audio if isinstance(audio, tuple) else (audio, SAMPLE_RATE)
        samples = resample(np.asarray(samples, dtype=np.float32), int(rate))
        if self._audio_features is None:
            from lmserve.audio.features import WhisperFeatures

            self._audio_features = WhisperFeatures(self.model_config.path)
        window = self._audio_features(samples)
        features = EncoderFeatures(window.tobytes(), list(window.shape))
        if "prompt_token_ids" in prompt:
            ids = [int(t) for t in prompt["prompt_token_ids"]]
        elif self.tokenizer is None:
            raise ValueError(f"{self.model_config.path} has no tokenizer; pass prompt_token_ids")
        elif prompt.get("prompt"):  # Whisper's special tokens are written out, none added
            ids = self.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
        else:
            ids = list(self.tokenizer.prefix_tokens)
        return ProcessedPrompt(prompt.get("prompt"), list(ids), encoder_features=features)

    def _image_prompt(self, prompt: dict[str, Any], add_special_tokens: bool) -> ProcessedPrompt:
        """A vision-language request: the images through the model's HF image processor, and
        the prompt with each placeholder expanded to the positions its rows fill."""
        if "vision_config" not in self.model_config.hf_config:
            kind = (
                "a speech model: it takes audio"
                if self.model_config.num_encoder_tokens
                else ("a text model")
            )
            raise ValueError(f"{self.model_config.model} takes no images: it is {kind}")
        if self._image_prompts is None:
            from lmserve.multimodal.processing import ImagePrompts

            self._image_prompts = ImagePrompts(self.model_config, self.tokenizer)
        ids, images = self._image_prompts(prompt, add_special_tokens)
        return ProcessedPrompt(prompt.get("prompt"), ids, images=images)

    def _prompt_embeds(self, value: Any) -> PromptEmbeds:
        """Embeddings checked to be what the model takes: a dense float [tokens, hidden_size]
        tensor (a leading batch dimension of 1 is dropped), finite, within the context. Bytes
        are a torch.save'd tensor, read with torch's weights-only unpickler."""
        import io

        import torch

        from lmserve.transfer import float32_bytes

        if not self.model_config.enable_prompt_embeds:
            raise ValueError(
                "prompt embeddings are off: start the engine with --enable-prompt-embeds "
                "(enable_prompt_embeds=True)"
            )
        if isinstance(value, bytes):
            try:
                value = torch.load(io.BytesIO(value), weights_only=True, map_location="cpu")
            except Exception as exc:  # noqa: BLE001 - any unreadable payload is the caller's
                raise ValueError(f"prompt_embeds is not a torch.save'd tensor: {exc}") from None
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise ValueError("prompt_embeds must be a dense tensor")
        if value.dim() == 3 and value.shape[0] == 1:
            value = value[0]
        hidden = self.model_config.hidden_size
        if value.dim() != 2 or value.shape[1] != hidden or value.shape[0] < 1:
            raise ValueError(
                f"prompt_embeds must have shape [num_tokens, {hidden}], got {list(value.shape)}"
            )
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise ValueError("prompt_embeds must hold finite floating-point numbers")
        return PromptEmbeds(float32_bytes(value), value.shape[0], hidden)

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
        if prompt.prompt_embeds is not None:
            cache_salt = _embeds_salt(prompt.prompt_embeds, params, cache_salt)
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
        if self.model_config.num_encoder_tokens and prompt.encoder_features is None:
            raise ValueError(
                f"{self.model_config.model} is a speech model: send audio "
                "({'multi_modal_data': {'audio': (samples, sample_rate)}}, or the transcription "
                "endpoint)"
            )
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
            prompt_embeds=prompt.prompt_embeds,
            encoder_features=prompt.encoder_features,
            images=list(prompt.images),
        )

    def make_pooling_request(
        self, req_id: str, prompt: ProcessedPrompt, params: PoolingParams
    ) -> EngineCoreRequest:
        """A prompt to pool; checked here, so a bad one never reaches the core."""
        if prompt.prompt_embeds is not None:
            raise ValueError("a pooling model takes text or token ids, not prompt_embeds")
        self._validate(prompt.prompt_token_ids, SamplingParams(max_tokens=None))
        if params.dimensions is not None:
            hf = self.model_config.hf_config
            if not (hf.get("is_matryoshka") or hf.get("matryoshka_dimensions")):
                raise ValueError(
                    f"{self.model_config.model} does not support dimensions: it is not a "
                    "Matryoshka model"
                )
            allowed = hf.get("matryoshka_dimensions")
            if allowed and params.dimensions not in allowed:
                raise ValueError(f"dimensions must be one of {allowed}, got {params.dimensions}")
            if params.dimensions > self.model_config.hidden_size:
                raise ValueError(
                    f"dimensions must be at most {self.model_config.hidden_size}, "
                    f"got {params.dimensions}"
                )
        return EngineCoreRequest(
            req_id=req_id,
            prompt_token_ids=prompt.prompt_token_ids,
            sampling_params=SamplingParams(max_tokens=None),
            eos_token_id=None,
            arrival_time=time.time(),
            pooling_params=params,
            token_type_ids=prompt.token_type_ids,
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


def _embeds_salt(embeds: PromptEmbeds, params: SamplingParams, cache_salt: str | None) -> str:
    """What a prompt given as embeddings may not ask for, checked; and its prefix-cache salt:
    its ids are placeholders, so its KV is shared only with the very same embeddings."""
    if params.prompt_logprobs is not None:
        raise ValueError("prompt_logprobs cannot be computed for a prompt given as embeddings")
    if params.repetition_penalty != 1.0:
        raise ValueError(
            "repetition_penalty needs the prompt's tokens, which a prompt given as embeddings "
            "does not have"
        )
    digest = hashlib.sha256(embeds.data).hexdigest()
    return f"{cache_salt or ''}\x00prompt_embeds:{digest}"
