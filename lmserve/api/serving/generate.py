"""POST /inference/v1/generate: token ids in, token ids out (vLLM's tokens-in/tokens-out API).
No chat template, no detokenized text in the answer: what the client sent is the prompt, what
the model sampled is the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator

from msgspec import UNSET

from lmserve.api.errors import APIError
from lmserve.api.generate_protocol import GenerateRequest
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas.common import Usage
from lmserve.api.schemas.generate import GenerateChoice, GenerateResponse
from lmserve.api.serving import common
from lmserve.api.serving.chat import ChatServing
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams


class GenerateServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig, chat: ChatServing):
        self.engine = engine
        self.config = config
        self.chat = chat  # its logprobs shape, with every token named by id

    async def create(self, request: GenerateRequest) -> Reply:
        if request.stream_options is not None and not request.stream:
            raise APIError(
                "stream_options can only be given when stream is true", param="stream_options"
            )
        model, lora = common.check_model(self.config, request.model)
        common.check_generates(self.engine, model)
        ids = list(request.token_ids)
        wanted = request.sampling_params.max_tokens
        common.check_prompt_length(self.engine, len(ids), wanted)
        room = self.engine.config.scheduler.max_model_len - len(ids)
        try:  # unset max_tokens: as many as the context holds, as vLLM's
            params = request.engine_params(max(room, 1))
        except ValueError as exc:
            raise APIError(str(exc), param="sampling_params") from None
        request_id = common.new_id("generate-tokens", request.request_id)
        common.log_request(self.config, request_id, None, len(ids), params)
        stream = common.first_within(
            self.engine.generate(
                {"prompt_token_ids": ids, "prompt": None},
                params,
                request_id,
                request.cache_salt,
                lora,
            ),
            self.config.max_waiting_time_s,
        )
        if request.stream:
            return Stream(self._stream(request, model, request_id, params, stream), True)
        final = await common.run_to_end(stream)
        num_completion = sum(len(o.token_ids) for o in final.outputs)
        cached = self.config.cached_tokens(final.num_cached_tokens)
        return Whole(
            GenerateResponse(
                request_id=request_id,
                created=common.now(),
                model=model,
                choices=[
                    self._choice(out, params, 0, out.finish_reason or "stop")
                    for out in final.outputs
                ],
                usage=Usage.of(len(ids), num_completion, cached),
                prompt_logprobs=common.prompt_logprobs(final)
                if params.prompt_logprobs is not None
                else None,
                kv_transfer_params=None,
            )
        )

    def _choice(
        self, out: CompletionOutput, params: SamplingParams, start: int, finish: str | None
    ) -> GenerateChoice:
        logprobs = None
        if params.logprobs is not None:
            k = -1 if params.logprobs == -1 else params.logprobs
            by_id = bool(params.logprob_token_ids)
            logprobs = self.chat.choice_logprobs(out, start, len(out.token_ids), k, True, by_id)
        return GenerateChoice(
            index=out.index,
            logprobs=logprobs,
            finish_reason=finish,
            token_ids=out.token_ids[start:],
        )

    async def _stream(
        self,
        request: GenerateRequest,
        model: str,
        request_id: str,
        params: SamplingParams,
        stream: AsyncIterator[RequestOutput],
    ) -> AsyncIterator[Event]:
        include_usage, continuous = self.config.stream_usage(request.stream_options)
        created = common.now()
        sent: dict[int, int] = {}  # choice -> tokens sent
        done: set[int] = set()  # choices whose last chunk went out
        last: RequestOutput | None = None
        async for snapshot in stream:
            last = snapshot
            for out in snapshot.outputs:
                start = sent.get(out.index, 0)
                if out.index in done or (len(out.token_ids) == start and not out.finished()):
                    continue  # nothing new (later snapshots of n > 1 repeat finished choices)
                sent[out.index] = len(out.token_ids)
                if out.finished():
                    done.add(out.index)
                usage = common.running_usage(snapshot) if continuous else UNSET
                yield Event(
                    GenerateResponse(
                        request_id=request_id,
                        created=created,
                        model=model,
                        choices=[self._choice(out, params, start, out.finish_reason)],
                        usage=usage,
                    )
                )
        if include_usage and last is not None:
            num_completion = sum(len(o.token_ids) for o in last.outputs)
            cached = self.config.cached_tokens(last.num_cached_tokens)
            usage = Usage.of(len(last.prompt_token_ids), num_completion, cached)
            yield Event(
                GenerateResponse(
                    request_id=request_id, created=created, model=model, choices=[], usage=usage
                )
            )
