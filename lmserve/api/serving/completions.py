"""POST /v1/completions: prompts as text, token ids or lists of either; streaming or not."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from msgspec import UNSET

from lmserve.api.errors import APIError
from lmserve.api.protocol import CompletionRequest
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas.common import Usage
from lmserve.api.schemas.completions import Completion, CompletionChoice, CompletionLogprobs
from lmserve.api.serving import common
from lmserve.engine.beam_search import beam_search
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import CompletionOutput, Logprob, RequestOutput


class CompletionServing:
    def __init__(
        self, engine: EngineClient, config: common.ServingConfig, encoder: common.PromptEncoder
    ) -> None:
        self.engine = engine
        self.config = config
        self.encoder = encoder

    async def _prompts(self, request: CompletionRequest) -> list[dict[str, Any]]:
        """Each prompt as {"prompt_token_ids", "prompt"} (vLLM's four prompt shapes), or as
        {"prompt_embeds": bytes} (the engine reads and checks the tensor), embeddings first."""
        prompts = self._embeds_prompts(request)
        prompt = request.prompt
        if prompt is None:
            if not prompts:
                raise APIError("prompt (or prompt_embeds) is required", param="prompt")
            return prompts
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]  # type: ignore[list-item]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items:
            raise APIError("prompt must not be empty", param="prompt")
        keep = common.keep_tokens(self.engine, request.truncate_prompt_tokens)
        side = request.truncation_side
        for item in items:
            if isinstance(item, str):
                ids = await self.encoder.encode(item, request.add_special_tokens, keep, side)
                text: str | None = item
            else:
                ids = common.truncate(list(item), keep, side)
                text = None
            common.check_prompt_length(self.engine, len(ids), request.max_tokens)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return prompts

    def _embeds_prompts(self, request: CompletionRequest) -> list[dict[str, Any]]:
        given = request.prompt_embeds
        if given is None:
            return []
        if not self.engine.config.model.enable_prompt_embeds:
            raise APIError(
                "prompt_embeds are off on this server: start it with --enable-prompt-embeds",
                param="prompt_embeds",
            )
        if request.echo:
            raise APIError("echo cannot repeat a prompt given as embeddings", param="echo")
        items = [given] if isinstance(given, str) else list(given)
        if not items:
            raise APIError("prompt_embeds must not be empty", param="prompt_embeds")
        prompts = []
        for item in items:
            try:
                data = base64.b64decode(item, validate=True)
            except binascii.Error:
                raise APIError(
                    "prompt_embeds must be base64 of a torch.save'd tensor", param="prompt_embeds"
                ) from None
            prompts.append({"prompt_embeds": data, "prompt": None})
        return prompts

    async def create(self, request: CompletionRequest) -> Reply:
        request.check_supported()
        model, lora = common.check_model(self.config, request.model)
        common.check_generates(self.engine, model)
        prompts = await self._prompts(request)
        params = request.sampling_params(
            request.max_tokens or 16, request.logprobs, self.config.sampling_defaults
        )
        if request.echo and request.logprobs is not None and request.prompt_logprobs is None:
            # as vLLM: echoed prompt tokens get logprobs too (the first one's null)
            params = replace(params, prompt_logprobs=request.logprobs)
        base_id = common.new_id("cmpl", request.request_id)
        for i, p in enumerate(prompts):
            num_prompt = len(p.get("prompt_token_ids", ()))
            common.log_request(self.config, f"{base_id}-{i}", p["prompt"], num_prompt, params)
        beams = request.beam_search_params(params) if request.use_beam_search else None
        if beams is not None and request.prompt_embeds is not None:
            raise APIError(
                "use_beam_search takes text or token-id prompts, not prompt_embeds",
                param="use_beam_search",
            )
        salt = request.cache_salt
        streams = [  # a beam search answers once, at its end: no first-token deadline
            common.first_within(
                self.engine.generate(
                    p, params, f"{base_id}-{i}", salt, lora, request.stream_interval
                ),
                self.config.max_waiting_time_s,
            )
            if beams is None
            else beam_search(self.engine, p, beams, f"{base_id}-{i}", salt, lora)
            for i, p in enumerate(prompts)
        ]
        if request.stream:
            return Stream(self._stream(request, model, base_id, prompts, streams), done_marker=True)
        finals = await common.run_all_to_end(streams)
        choices = []
        for i, final in enumerate(finals):
            for out in final.outputs:
                index = i * params.n + out.index
                from_embeds = "prompt_embeds" in prompts[i]
                choices.append(self._choice(request, index, final, out, from_embeds))
        num_prompt = sum(len(f.prompt_token_ids) for f in finals)  # embeddings: one per row
        num_completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
        cached = self.config.cached_tokens(sum(f.num_cached_tokens for f in finals))
        return Whole(
            Completion(
                id=base_id,
                created=common.now(),
                model=model,
                choices=choices,
                usage=Usage.of(num_prompt, num_completion, cached),
                metrics=self.config.response_metrics(finals),
            )
        )

    def _choice(
        self,
        request: CompletionRequest,
        index: int,
        final: RequestOutput,
        out: CompletionOutput,
        from_embeds: bool,
    ) -> CompletionChoice:
        as_ids = self.config.tokens_as_ids(request.return_tokens_as_token_ids)
        text = (final.prompt or "") + out.text if request.echo else out.text
        logprobs = None
        if request.logprobs is not None:
            ids, entries = list(out.token_ids), list(out.logprobs or [])
            if request.echo:
                ids[:0] = final.prompt_token_ids
                entries[:0] = final.prompt_logprobs or [None] * len(final.prompt_token_ids)
            logprobs = self._logprobs(ids, entries, as_ids, 0)
        return CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=out.stop_reason,
            # as vLLM's whole answers: present, null unless asked for
            prompt_logprobs=common.prompt_logprobs(final)
            if request.prompt_logprobs is not None
            else None,
            # none for a prompt given as embeddings: its ids are placeholders
            prompt_token_ids=final.prompt_token_ids
            if request.return_token_ids and not from_embeds
            else None,
            token_ids=out.token_ids if request.return_token_ids else None,
        )

    def _logprobs(
        self,
        token_ids: list[int],
        entries: Sequence[dict[int, Logprob] | None],
        as_ids: bool,
        text_offset: int,
    ) -> CompletionLogprobs:
        """OpenAI's legacy logprobs for these tokens; `text_offset` is where the first one's
        text starts in the choice's text. An entry of None (the first echoed prompt token,
        which has no context to be predicted from) gives a null logprob, as vLLM's."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        text = self.config.token_text
        for token_id, entry in zip(token_ids, entries, strict=False):
            if entry is None:
                decoded = self.engine.tokenizer.decode([token_id]) if self.engine.tokenizer else ""
                tokens.append(text(token_id, decoded, as_ids))
                token_logprobs.append(None)
                top.append(None)
            else:
                chosen = entry[token_id]
                tokens.append(text(token_id, chosen.decoded_token, as_ids))
                token_logprobs.append(common.finite_logprob(chosen.logprob))
                top.append(
                    {
                        text(tid, lp.decoded_token, as_ids): common.finite_logprob(lp.logprob)
                        for tid, lp in entry.items()
                    }
                )
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        return CompletionLogprobs(
            tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets
        )

    async def _stream(
        self,
        request: CompletionRequest,
        model: str,
        base_id: str,
        prompts: list[dict[str, Any]],
        streams: list[AsyncIterator[RequestOutput]],
    ) -> AsyncIterator[Event]:
        as_ids = self.config.tokens_as_ids(request.return_tokens_as_token_ids)
        n = request.n or 1
        include_usage, continuous = self.config.stream_usage(request.stream_options)
        tracker = common.DeltaTracker()
        created = common.now()
        num_completion = 0
        num_cached: dict[int, int] = {}  # prompt -> its prefix-cache hits
        lasts: dict[int, RequestOutput] = {}  # prompt -> its latest snapshot
        sent_chars: dict[int, int] = {}  # choice -> characters of text sent
        async for i, snapshot in common.merge_streams(streams):
            num_cached[i] = snapshot.num_cached_tokens
            lasts[i] = snapshot
            for out in snapshot.outputs:
                index = i * n + out.index
                echo = (snapshot.prompt or "") if request.echo else ""
                first = tracker.is_new(index)
                if first and echo and not out.token_ids and out.finish_reason is None:
                    continue  # the echo goes with the first token, and the prompt's logprobs
                sent = tracker.advance(index, out, prefix=echo)
                if sent is None:
                    continue
                delta, token_start = sent
                logprobs = None
                if request.logprobs is not None:
                    ids = out.token_ids[token_start:]
                    entries = (out.logprobs or [])[token_start:]
                    if first and echo:
                        ids = [*snapshot.prompt_token_ids, *ids]
                        prompt = snapshot.prompt_logprobs or [None] * len(ids)
                        entries = [*prompt[: len(snapshot.prompt_token_ids)], *entries]
                    logprobs = self._logprobs(ids, entries, as_ids, sent_chars.get(index, 0))
                sent_chars[index] = sent_chars.get(index, 0) + len(delta)
                choice = CompletionChoice(
                    index=index,
                    text=delta,
                    logprobs=logprobs,
                    finish_reason=out.finish_reason,
                    stop_reason=out.stop_reason,
                )
                if request.return_token_ids:  # as vLLM: the new tokens, the prompt's first
                    choice.token_ids = out.token_ids[token_start:]
                    if first and "prompt_embeds" not in prompts[i]:
                        choice.prompt_token_ids = snapshot.prompt_token_ids
                if out.finish_reason is not None:
                    num_completion += len(out.token_ids)
                usage = common.running_usage(snapshot) if continuous else UNSET
                yield Event(
                    Completion(
                        id=base_id, created=created, model=model, choices=[choice], usage=usage
                    )
                )
        if include_usage:
            num_prompt = sum(len(last.prompt_token_ids) for last in lasts.values())
            cached = self.config.cached_tokens(sum(num_cached.values()))
            usage = Usage.of(num_prompt, num_completion, cached)
            metrics = self.config.response_metrics(list(lasts.values()))
            yield Event(
                Completion(
                    id=base_id,
                    created=created,
                    model=model,
                    choices=[],
                    usage=usage,
                    metrics=metrics,
                )
            )
