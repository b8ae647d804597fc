"""What every generation endpoint shares: prompt checks, streaming, usage, ids."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET, UnsetType

from lmserve.api.admission import overloaded
from lmserve.api.errors import APIError
from lmserve.api.schemas.common import PromptLogprob, PromptLogprobs, ResponseMetrics, Usage
from lmserve.api.serving.models import LoRAModules
from lmserve.chat_template import ContentFormat
from lmserve.engine.protocol import EngineClient
from lmserve.lora.request import LoRARequest
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lmserve.sampling_params import SamplingParams

logger = logging.getLogger("lmserve.requests")


@dataclass(frozen=True)
class ServingConfig:
    served_model_names: list[str]
    response_role: str = "assistant"
    chat_template: str | None = None
    chat_template_content_format: ContentFormat = "auto"
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    log_requests: bool = False  # --enable-log-requests: off by default, as in vLLM
    max_log_len: int | None = None  # prompt characters a request's log line shows
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    enable_force_include_usage: bool = False  # a usage chunk ends every stream
    # adapters served by name; the registry object is shared, its contents change at runtime
    lora_modules: LoRAModules = field(default_factory=LoRAModules)
    allow_runtime_lora_updating: bool = False  # /v1/load_lora_adapter and /v1/unload_lora_adapter
    return_tokens_as_token_ids: bool = False  # logprob tokens as "token_id:{id}"
    enable_tokenizer_info_endpoint: bool = False  # GET /tokenizer_info
    server_dev_mode: bool = False  # vLLM's dev-only routes: /sleep, /wake_up, /is_sleeping
    enable_playground: bool = True  # the chat page at / and the metrics page at /dashboard
    max_num_queued_reqs: int | None = None  # sequences in flight; beyond it a 503
    max_num_queued_tokens: int | None = None  # prompt tokens waiting for prefill; at it a 503
    sse_keep_alive_interval: float | None = None  # seconds an idle stream waits for a ping
    max_request_body_mb: float = 32.0  # a larger body is a 413 before it is read whole
    trust_request_chat_template: bool = False  # run a `chat_template` sent with a request
    max_waiting_time_s: float | None = None  # a request with no token by then gets a 503
    enable_per_request_metrics: bool = False  # a `metrics` object on each one-sample answer
    max_audio_file_mb: float = 25.0  # a larger uploaded audio file is a 413 (vLLM's default)
    max_audio_duration_s: float = (
        1800.0  # longer audio is a 400: its windows would crowd out others
    )

    def __post_init__(self) -> None:
        if self.max_num_queued_reqs is not None and self.max_num_queued_reqs < 1:
            raise ValueError(f"--max-num-queued-reqs must be >= 1, got {self.max_num_queued_reqs}")
        if self.max_num_queued_tokens is not None and self.max_num_queued_tokens < 1:
            raise ValueError(
                f"--max-num-queued-tokens must be >= 1, got {self.max_num_queued_tokens}"
            )
        if self.max_waiting_time_s is not None and self.max_waiting_time_s <= 0:
            raise ValueError(f"--max-waiting-time-s must be > 0, got {self.max_waiting_time_s}")
        if self.max_audio_file_mb <= 0:
            raise ValueError(f"--max-audio-file-mb must be > 0, got {self.max_audio_file_mb}")
        if self.max_audio_duration_s <= 0:
            raise ValueError(
                f"--max-audio-duration-s must be > 0 seconds, got {self.max_audio_duration_s}"
            )
        if self.max_request_body_mb <= 0:
            raise ValueError(f"--max-request-body-mb must be > 0, got {self.max_request_body_mb}")
        if self.sse_keep_alive_interval is not None and self.sse_keep_alive_interval <= 0:
            raise ValueError(
                f"--sse-keep-alive-interval must be > 0 seconds, got {self.sse_keep_alive_interval}"
            )

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def cached_tokens(self, num_cached: int) -> int | None:
        """What usage reports of prefix-cache hits: nothing unless asked for."""
        return num_cached if self.enable_prompt_tokens_details else None

    def token_text(self, token_id: int, decoded: str | None, as_ids: bool) -> str:
        """A logprob entry's token: its text, or "token_id:{id}" (for clients that must not
        re-tokenize text)."""
        return f"token_id:{token_id}" if as_ids else decoded or ""

    def tokens_as_ids(self, asked: bool | None) -> bool:
        """The request's return_tokens_as_token_ids, else --return-tokens-as-token-ids."""
        return self.return_tokens_as_token_ids if asked is None else asked

    def response_metrics(self, finals: list[RequestOutput]) -> ResponseMetrics | None | UnsetType:
        """The answer's `metrics` with --enable-per-request-metrics (else UNSET: no field),
        null unless the answer is one generation: n > 1 or several prompts have no one
        timeline to report."""
        if not self.enable_per_request_metrics:
            return UNSET
        if len(finals) != 1:
            return None
        timeline = finals[0].metrics
        return None if timeline is None else _metrics_ms(timeline)

    def stream_usage(self, stream_options: Any) -> tuple[bool, bool]:
        """(whether a stream ends with a usage chunk, whether every chunk carries usage so far),
        as vLLM decides: continuous usage only with include_usage; --enable-force-include-usage
        turns both on."""
        if self.enable_force_include_usage:
            return True, True
        include = bool(stream_options and stream_options.include_usage)
        return include, include and bool(stream_options.continuous_usage_stats)


def _metrics_ms(t: RequestMetrics) -> ResponseMetrics:
    def ms(start: float | None, end: float | None) -> float | None:
        return None if start is None or end is None else round(1000 * (end - start), 3)

    decode = ms(t.first_token_time, t.last_token_time)
    inference = ms(t.scheduled_time, t.last_token_time)
    n = t.num_generation_tokens
    return ResponseMetrics(
        time_to_first_token_ms=ms(t.scheduled_time, t.first_token_time),
        generation_time_ms=decode,
        queue_time_ms=ms(t.arrival_time, t.scheduled_time),
        mean_itl_ms=None if decode is None or n < 2 else round(decode / (n - 1), 3),
        tokens_per_second=None if not inference else round(1000 * n / inference, 3),
    )


def check_model(config: ServingConfig, model: str | None) -> tuple[str, LoRARequest | None]:
    """The name to answer with, and the adapter when `model` names one."""
    if model is None or model in config.served_model_names:
        return config.model_name, None
    lora = config.lora_modules.get(model)
    if lora is not None:
        return model, lora
    raise APIError(
        f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found"
    )


def check_generates(engine: EngineClient, model: str) -> None:
    """A pooling model asked to generate: a 400 that says which flag serves what."""
    if engine.config.runner == "pooling":
        raise APIError(
            f"The model `{model}` is a pooling model (--runner pooling): it serves /v1/embeddings, "
            "/pooling, /classify, /score and /rerank and does not generate text; serve a "
            "generative model (--runner generate) to chat or complete",
            param="model",
        )


def check_prompt_length(engine: EngineClient, num_prompt: int, max_tokens: int | None) -> None:
    """vLLM's wording, so clients that parse it keep working."""
    limit = engine.config.scheduler.max_model_len
    if num_prompt > limit:
        raise APIError(
            f"This model's maximum context length is {limit} tokens. However, your request has "
            f"{num_prompt} input tokens. Please reduce the length of the input messages.",
            param="messages",
            code="context_length_exceeded",
        )
    if max_tokens is not None and num_prompt + max_tokens > limit:
        raise APIError(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in "
            "the completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


class PromptEncoder:
    """Prompt text to token ids in a worker thread, so a long prompt does not hold the event
    loop (the tokenizer releases the GIL while it works). A text too long to fit the context
    whatever its tokens is refused before it is tokenized: no token covers more bytes than the
    longest vocabulary entry, so a text of B bytes has at least B / that many tokens (halved
    again for normalizers that drop characters)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    @functools.cached_property
    def _bytes_per_token(self) -> int:
        vocab = self.engine.tokenizer.get_vocab()
        return 2 * max((len(t.encode("utf-8", "surrogatepass")) for t in vocab), default=1)

    async def encode(
        self,
        text: str,
        add_special_tokens: bool,
        truncate_to: int | None = None,
        truncation_side: str = "left",
    ) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise APIError("this model has no tokenizer: send token ids", param="prompt")
        limit = self.engine.config.scheduler.max_model_len
        if truncate_to is None and len(text) > limit:
            at_least = len(text.encode()) // self._bytes_per_token
            if at_least > limit:
                raise APIError(
                    f"This model's maximum context length is {limit} tokens. However, your "
                    f"request has at least {at_least} input tokens. Please reduce the length "
                    "of the input messages.",
                    param="messages",
                    code="context_length_exceeded",
                )
        ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return truncate(ids, truncate_to, truncation_side)


def log_request(
    config: ServingConfig,
    request_id: str,
    prompt: str | None,
    num_prompt: int,
    params: SamplingParams,
) -> None:
    if config.log_requests:
        shown = (
            prompt if prompt is None or config.max_log_len is None else prompt[: config.max_log_len]
        )
        logger.info(
            "request %s: %d prompt tokens, prompt: %r, %s", request_id, num_prompt, shown, params
        )


def new_id(prefix: str, request_id: str | None) -> str:
    return f"{prefix}-{request_id or uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


async def first_within(
    stream: AsyncIterator[RequestOutput], seconds: float | None
) -> AsyncIterator[RequestOutput]:
    """The stream, ended (and its request aborted) with a 503 if its first output has not come
    within `seconds` (--max-waiting-time-s): a client behind a long queue is told to come back
    instead of being held until it gives up."""
    if seconds is None:
        async for output in stream:
            yield output
        return
    try:
        first = await asyncio.wait_for(anext(stream), seconds)
    except asyncio.TimeoutError:
        await stream.aclose()  # type: ignore[attr-defined]  # aborts it, if not already
        raise overloaded(
            f"no output after {seconds:g} s waiting for the engine (--max-waiting-time-s)"
        ) from None
    yield first
    async for output in stream:
        yield output


async def run_all_to_end(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """The final outputs of several requests run at once (so the scheduler batches them);
    if one fails, the others are cancelled, and so aborted."""
    tasks = [asyncio.ensure_future(run_to_end(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def run_to_end(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = None
    async for output in stream:
        last = output
    assert last is not None
    return last


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' snapshots as they come, tagged with the stream's index."""
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((i, output))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class DeltaTracker:
    """What each choice of a stream has been sent so far, so every chunk carries only the new
    text, and the logprobs of only the new tokens."""

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int]] = {}  # index -> (chars, tokens) sent
        self._finished: set[int] = set()  # choices whose last chunk went out

    def is_new(self, index: int) -> bool:
        return index not in self._sent

    def advance(
        self, index: int, out: CompletionOutput, prefix: str = ""
    ) -> tuple[str, int] | None:
        """(text to send, first unsent token); None when there is nothing to send, including
        for a choice already finished (later snapshots of an n > 1 request repeat it).
        `prefix` goes before the choice's first text (completions' echo)."""
        if index in self._finished:
            return None
        text_start, token_start = self._sent.get(index, (0, 0))
        delta = (prefix if self.is_new(index) else "") + out.text[text_start:]
        if not delta and out.finish_reason is None:
            self._sent[index] = (text_start, token_start)  # seen: no longer new
            return None
        self._sent[index] = (len(out.text), len(out.token_ids))
        if out.finish_reason is not None:
            self._finished.add(index)
        return delta, token_start


def finite_logprob(logprob: float) -> float:
    """A token the grammar ruled out has logprob -inf, which JSON cannot carry: vLLM's -9999."""
    return max(logprob, -9999.0)


def running_usage(snapshot: RequestOutput) -> Usage:
    """Usage so far, for stream_options.continuous_usage_stats."""
    num_completion = sum(len(o.token_ids) for o in snapshot.outputs)
    return Usage.of(len(snapshot.prompt_token_ids), num_completion)


def keep_tokens(engine: EngineClient, truncate_prompt_tokens: int | None) -> int | None:
    """The prompt tokens a request keeps: truncate_prompt_tokens, where -1 is the context."""
    if truncate_prompt_tokens == -1:
        return engine.config.scheduler.max_model_len
    return truncate_prompt_tokens


def truncate(ids: list[int], keep: int | None, side: str = "left") -> list[int]:
    """At most `keep` tokens: the last ones (cut on the left, vLLM's default) or the first."""
    if not keep or len(ids) <= keep:
        return ids
    return ids[-keep:] if side == "left" else ids[:keep]


def prompt_logprobs(output: RequestOutput) -> PromptLogprobs | None:
    """vLLM's shape: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}}."""
    if output.prompt_logprobs is None:
        return None
    return [
        None
        if entry is None
        else {
            str(tid): PromptLogprob(
                logprob=finite_logprob(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token
            )
            for tid, lp in entry.items()
        }
        for entry in output.prompt_logprobs
    ]
