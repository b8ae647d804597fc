"""AsyncEngine: many concurrent `generate()` streams over one engine core in its own process.

One task reads the core's outputs, detokenizes them and hands each request its snapshot through
its own queue. A caller that stops iterating (a client gone away) aborts its request at once, so
the core frees its blocks in the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from lmserve.config import EngineConfig
from lmserve.engine.args import create_engine_config
from lmserve.engine.core_client import AsyncMPCoreClient
from lmserve.engine.dp_client import DataParallelCoreClient
from lmserve.engine.input_processor import InputProcessor, ProcessedPrompt, PromptType
from lmserve.engine.messages import (
    Abort,
    ControlDone,
    CoreFailed,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    GetStats,
    Outputs,
    Ready,
    ResetPrefixCache,
    SchedulerStats,
    Sleep,
    Stats,
    WakeUp,
    merge_stats,
)
from lmserve.engine.metrics import EngineMetrics
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.protocol import (
    EngineClient,
    EngineDeadError,
    EngineRequestError,
    EngineSleepingError,
)
from lmserve.engine.tokenizer import load_tokenizer
from lmserve.lora.request import LoRARequest
from lmserve.outputs import PoolingOutput, PoolingRequestOutput, RequestOutput
from lmserve.pooling_params import PoolingParams
from lmserve.sampling_params import SamplingParams
from lmserve.tracing.context import current_trace_headers

logger = logging.getLogger(__name__)


class AsyncEngine(EngineClient):
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any | None,
        client: AsyncMPCoreClient | DataParallelCoreClient,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(
            config.model, tokenizer, config.structured_output.backend, config.lora
        )
        self.output_processor = OutputProcessor(tokenizer)
        self.client = client
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._pooling: dict[str, asyncio.Future[EngineCoreOutput]] = {}  # pooling requests
        self._stats: asyncio.Queue[SchedulerStats] = asyncio.Queue()
        self._done: asyncio.Queue[str] = asyncio.Queue()  # the core's answers to sleep / wake_up
        self._control = asyncio.Lock()  # one sleep / wake_up at a time
        self._sleep_level = 0
        observability = config.observability
        self.metrics = EngineMetrics(
            observability.served_model_name or config.model.model,
            observability.metrics_prefix,
            speculative=config.speculative is not None,
            num_engines=config.data_parallel_size,
        )
        self._output_task: asyncio.Task[None] | None = None
        self._log_task: asyncio.Task[None] | None = None
        self._dead: str | None = None
        self._counter = itertools.count()
        self._prefill: dict[str, int] = {}  # child request id -> its prompt tokens, until output
        self._num_prefill_tokens = 0
        self._tracer = None
        self._traced: dict[str, tuple[list[str], SamplingParams, dict[str, str] | None]] = {}
        if observability.otlp_traces_endpoint is not None:
            from lmserve.tracing.otel import RequestTracer

            self._tracer = RequestTracer(
                observability.otlp_traces_endpoint, observability.otlp_traces_protocol
            )

    @classmethod
    async def start(
        cls,
        model: str | None = None,
        *,
        start_timeout_s: float = 600.0,
        log_stats: bool = True,
        log_stats_interval_s: float = 10.0,
        **engine_args: Any,
    ) -> AsyncEngine:
        """Resolve the model, start the core process, wait for it to load. With `log_stats`, a
        line of throughput and cache state is logged every `log_stats_interval_s` while there is
        work."""
        config = create_engine_config(model, **engine_args)
        tokenizer = load_tokenizer(config.model.path) if config.model.has_tokenizer else None
        client = (
            DataParallelCoreClient(config)
            if config.data_parallel_size > 1
            else AsyncMPCoreClient(config)
        )
        ready = await client.start(start_timeout_s)
        engine = cls(config, tokenizer, client)
        cache = config.cache
        engine.metrics.record_cache_config(
            {
                "block_size": str(cache.block_size),
                "num_gpu_blocks": str(ready.num_usable_blocks),
                "enable_prefix_caching": str(cache.enable_prefix_caching),
                "gpu_memory_utilization": str(cache.gpu_memory_utilization),
            }
        )
        engine._output_task = asyncio.create_task(engine._output_loop(), name="lmserve-outputs")
        if log_stats:
            engine._log_task = asyncio.create_task(
                engine._log_loop(log_stats_interval_s), name="lmserve-stats-log"
            )
        return engine

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and self.client.is_alive

    @property
    def eos_token_id(self) -> int | None:
        return self.input_processor.eos_token_id

    @property
    def num_prefill_tokens(self) -> int:
        return self._num_prefill_tokens

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        lora_request: LoRARequest | None = None,
        stream_interval: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative snapshots of the request, the last one finished: the first, then one each
        `stream_interval` new tokens (never fewer than the config's: a server's floor), then the
        last. Bad input raises ValueError here, before anything is queued or streamed, so a
        server can answer 400."""
        if not self.is_healthy:
            raise EngineDeadError(self._dead or "the engine core process exited")
        if self._sleep_level:
            raise EngineSleepingError("the engine is asleep: wake it up (POST /wake_up) first")
        if self.config.runner == "pooling":
            raise ValueError(
                "this server runs a pooling model (--runner pooling): it embeds and does not "
                "generate; serve a generative model to generate"
            )
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        processed = self.input_processor.tokenize_prompt(prompt)
        children = self.input_processor.make_requests(
            request_id, processed, sampling_params, cache_salt, lora_request
        )
        # Counted now, not when the stream is first read, so a burst of streams sees itself;
        # a stream dropped unread gives its count back when it is collected.
        for child in children:
            self._prefill[child.req_id] = len(child.prompt_token_ids)
            self._num_prefill_tokens += len(child.prompt_token_ids)
        # read now: the caller's context (an HTTP request's trace) is this call's, not the
        # stream's, which may be read after the handler returned
        trace_headers = current_trace_headers() if self._tracer is not None else None
        interval = max(stream_interval or 1, self.config.stream_interval)
        stream = self._run(
            request_id, processed, sampling_params, children, trace_headers, interval
        )
        weakref.finalize(stream, self._prefilled, [c.req_id for c in children])
        return stream

    async def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams,
        request_id: str | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> PoolingRequestOutput:
        from lmserve.transfer import float32_tensor

        if not self.is_healthy:
            raise EngineDeadError(self._dead or "the engine core process exited")
        if self.config.runner != "pooling":
            raise ValueError(
                "this server runs a generative model: embeddings need a pooling model "
                "(lmserve serve MODEL --runner pooling)"
            )
        request_id = request_id or f"req-{next(self._counter)}"
        if request_id in self._queues or request_id in self._pooling:
            raise ValueError(f"request id {request_id!r} is already in use")
        # tokenized off the event loop: a long text does not hold the other requests
        processed = await asyncio.to_thread(
            self.input_processor.tokenize_truncated, prompt, truncate_prompt_tokens
        )
        if request_id in self._pooling:  # taken while this one was being tokenized
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.input_processor.make_pooling_request(request_id, processed, pooling_params)
        done: asyncio.Future[EngineCoreOutput] = asyncio.get_running_loop().create_future()
        self._pooling[request_id] = done
        engine = self.client.route(request)
        self.metrics.record_arrival(request_id, len(request.prompt_token_ids), engine)
        try:
            await self.client.send(request)
            out = await done
        except BaseException:
            if self._pooling.pop(request_id, None) is not None and self.is_healthy:
                self.metrics.record_abort(request_id)
                await self.client.send(Abort([request_id]))
            raise
        if out.pooled is None:
            raise EngineRequestError(
                f"the engine failed while pooling request {request_id}; the server's log has "
                "the cause"
            )
        data = float32_tensor(out.pooled.data, out.pooled.shape)
        return PoolingRequestOutput(request_id, PoolingOutput(data), request.prompt_token_ids)

    def _prefilled(self, child_ids: list[str]) -> None:
        """These requests are past prefill (or gone): out of the backlog."""
        for child_id in child_ids:
            self._num_prefill_tokens -= self._prefill.pop(child_id, 0)

    def check_lora(self, lora_request: LoRARequest) -> None:
        self.input_processor.check_lora(lora_request)

    async def _run(
        self,
        request_id: str,
        processed: ProcessedPrompt,
        sampling_params: SamplingParams,
        children: list[EngineCoreRequest],
        trace_headers: dict[str, str] | None = None,
        stream_interval: int = 1,
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self.output_processor.add_request(
            request_id,
            processed.prompt,
            processed.prompt_token_ids,
            sampling_params,
            [c.req_id for c in children],
            from_embeds=processed.prompt_embeds is not None,
        )
        finished = False
        sent: int | None = None  # output tokens in the last snapshot given out
        try:
            if self._tracer is not None:  # its span is recorded when it finishes
                child_ids = [c.req_id for c in children]
                self._traced[request_id] = (child_ids, sampling_params, trace_headers)
            for i, child in enumerate(children):
                engine = self.client.route(child)
                if i == 0:
                    self.metrics.record_params(
                        sampling_params.n, sampling_params.max_tokens, engine
                    )
                self.metrics.record_arrival(child.req_id, len(child.prompt_token_ids), engine)
                await self.client.send(child)
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if any(o.finish_reason == FinishReason.ERROR for o in item.outputs):
                    raise EngineRequestError(
                        f"the engine failed while running request {request_id} and went on "
                        "without it; the server's log has the cause"
                    )
                finished = item.finished
                tokens = sum(len(o.token_ids) for o in item.outputs)
                # (snapshots are cumulative: one skipped is in the next)
                if finished or sent is None or tokens - sent >= stream_interval:
                    sent = tokens
                    yield item
        finally:
            self._queues.pop(request_id, None)
            self._traced.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request now; its KV blocks are freed in the core's next step."""
        child_ids = self.output_processor.abort(request_id)
        self._queues.pop(request_id, None)
        self._prefilled(child_ids)
        for child_id in child_ids:
            self.metrics.record_abort(child_id)
        if child_ids and self.is_healthy:
            await self.client.send(Abort(child_ids))

    async def sleep(self, level: int = 1) -> None:
        async with self._control:
            await self._call_core(Sleep(level))
            self._sleep_level = level
            self.metrics.record_sleep(level)

    async def wake_up(self) -> None:
        async with self._control:
            await self._call_core(WakeUp())
            self._sleep_level = 0
            self.metrics.record_sleep(0)

    async def reset_prefix_cache(self) -> None:
        async with self._control:
            await self._call_core(ResetPrefixCache())

    @property
    def is_sleeping(self) -> bool:
        return self._sleep_level > 0

    async def _call_core(self, message: Sleep | WakeUp | ResetPrefixCache) -> None:
        """Send a control message and wait for the core's answer (a level-2 wake-up loads the
        weights again, so it may take as long as the start did)."""
        num_engines = self.client.num_engines
        await self.client.send(message)
        errors = [await asyncio.wait_for(self._done.get(), timeout=600) for _ in range(num_engines)]
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if any(errors):
            raise ValueError(next(e for e in errors if e))

    async def get_stats(self) -> SchedulerStats:
        """The core's counters: running/waiting requests, free blocks, preemptions (every
        core's together, with data parallel)."""
        num_engines = self.client.num_engines
        await self.client.send(GetStats())
        return merge_stats(
            [await asyncio.wait_for(self._stats.get(), timeout=30) for _ in range(num_engines)]
        )

    async def _output_loop(self) -> None:
        while True:
            match await self.client.receive():
                case Outputs(outputs=core_outputs, stats=stats, engine=engine):
                    self.metrics.record_step(core_outputs, stats, engine)
                    if self._pooling:
                        for out in core_outputs:
                            pooled = self._pooling.pop(out.req_id, None)
                            if pooled is not None and not pooled.done():
                                pooled.set_result(out)
                    if self._prefill:
                        self._prefilled([out.req_id for out in core_outputs])
                    outputs, to_abort = self.output_processor.process(core_outputs, snapshots=True)
                    if to_abort:
                        with contextlib.suppress(EngineDeadError):  # the next receive says so
                            await self.client.send(Abort(to_abort))
                    for output in outputs:
                        if output.finished and len(output.outputs) == 1:  # one child: itself
                            output.metrics = self.metrics.request_metrics(output.request_id)
                        if output.finished and self._tracer is not None:
                            self._trace(output)
                        queue = self._queues.get(output.request_id)
                        if queue is not None:
                            queue.put_nowait(output)
                case Stats(stats=stats, engine=engine):
                    self.metrics.record_stats(stats, engine)
                    self._stats.put_nowait(stats)
                case ControlDone(error=error):
                    self._done.put_nowait(error)
                case CoreFailed(reason=reason):
                    self._fail(reason)
                    return
                case Ready():
                    pass  # only ever the first message, which start() consumed

    def _trace(self, output: RequestOutput) -> None:
        """A finished request's span (none for one that was not traced, or has no timeline)."""
        from lmserve.tracing.otel import TracedRequest

        assert self._tracer is not None
        traced = self._traced.pop(output.request_id, None)
        # the timeline of a child that finished in this step (the one that finished the request)
        timelines = [self.metrics.request_metrics(c) for c in traced[0]] if traced else []
        timeline = next((t for t in timelines if t is not None), None)
        if traced is None or timeline is None:
            return
        _, params, headers = traced
        self._tracer.record(
            TracedRequest(
                request_id=output.request_id,
                model=self.config.observability.served_model_name or self.config.model.model,
                headers=headers,
                timeline=timeline,
                finished=time.time(),
                num_prompt_tokens=len(output.prompt_token_ids or []),
                num_completion_tokens=sum(len(o.token_ids) for o in output.outputs),
                num_sequences=len(output.outputs),
                n=params.n,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
            )
        )

    async def _log_loop(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.metrics.log_interval()

    def _fail(self, reason: str) -> None:
        """The core died: every waiting request gets EngineDeadError instead of hanging."""
        logger.error("engine core died: %s", reason)
        self._dead = reason
        self._prefill.clear()
        self._num_prefill_tokens = 0
        self._done.put_nowait(reason)  # a sleep / wake_up waiting for the core
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(EngineDeadError(reason))
            self.output_processor.abort(request_id)
        for pooled in self._pooling.values():
            if not pooled.done():
                pooled.set_exception(EngineDeadError(reason))
        self._pooling.clear()

    async def shutdown(self) -> None:
        """Stop the core. Requests still in flight end with EngineDeadError, not a hang."""
        if self._queues:
            logger.warning(
                "shutting down with %d requests in flight: aborting them", len(self._queues)
            )
        self._dead = self._dead or "the engine was shut down"
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(EngineDeadError(self._dead))
            self.output_processor.abort(request_id)
        tasks = [t for t in (self._output_task, self._log_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.shutdown()
        if self._tracer is not None:
            await asyncio.to_thread(self._tracer.shutdown)  # sends the spans still queued
