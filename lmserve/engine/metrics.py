"""Prometheus metrics named like vLLM's (`lmserve:` for `vllm:`), and the periodic stats log.

Request timings are taken in the API process, where the tokens arrive; scheduler gauges and
counters come from the core with every step. Each engine has its own registry: no global state.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lmserve.engine.messages import EngineCoreOutput, FinishReason, SchedulerStats, merge_stats
from lmserve.outputs import RequestMetrics

logger = logging.getLogger("lmserve.stats")

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0)  # fmt: skip
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
_N_BUCKETS = (1, 2, 5, 10, 20)
_SLEEP_STATES = {"awake": 0, "weights_offloaded": 1, "discard_all": 2}  # vLLM's names by level


@dataclass
class _Timing:
    arrival: float
    num_prompt_tokens: int
    engine: int  # the core (data parallel rank) the request went to
    scheduled: float | None = None  # wall clock of its first scheduling
    first_token: float | None = None
    last_token: float | None = None
    num_generated: int = 0

    def snapshot(self) -> RequestMetrics:
        return RequestMetrics(
            self.arrival, self.scheduled, self.first_token, self.last_token, self.num_generated
        )


@dataclass
class _Interval:
    """Tokens since the last log line."""

    start: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    generation_tokens: int = 0


class EngineMetrics:
    """`prefix` names the series: `lmserve` (ours) or `vllm`, so dashboards and autoscalers
    written for vLLM's `vllm:*` series read an lmserve server unchanged; `model_name` labels
    them with the served name and `engine` with the core's data parallel rank, as vLLM does.
    With `speculative`, the spec_decode_* counters too (vLLM registers them only when
    speculating)."""

    def __init__(
        self,
        model_name: str,
        prefix: str = "lmserve",
        speculative: bool = False,
        num_engines: int = 1,
    ) -> None:
        self.registry = CollectorRegistry()
        self._prefix = prefix
        labels = ["model_name", "engine"]
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{prefix}:{name}", doc, [*labels, *extra], registry=r)

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{prefix}:{name}", doc, [*labels, *extra], registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, labels, buckets=buckets, registry=r)

        self._running = gauge("num_requests_running", "Requests in the running batch")
        self._waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self._kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
        # the older name, which vLLM's example Grafana dashboard still charts
        self._gpu_cache_usage = (
            gauge("gpu_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
            if prefix == "vllm"
            else None
        )
        self._sleep = gauge(
            "engine_sleep_state", "1 for the engine's sleep state", ("sleep_state",)
        )
        self._cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up")
        self._cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self._mm_queries = counter("mm_cache_queries", "Images prompts needed")
        self._mm_hits = counter("mm_cache_hits", "Images found already encoded")
        self._preemptions = counter("num_preemptions", "Requests preempted by recompute")
        self._spec = (
            (
                counter("spec_decode_num_drafts", "Steps that checked a request's guesses"),
                counter("spec_decode_num_draft_tokens", "Guessed tokens checked"),
                counter("spec_decode_num_accepted_tokens", "Guessed tokens accepted"),
                counter(
                    "spec_decode_num_accepted_tokens_per_pos",
                    "Guessed tokens accepted, by position in the guess",
                    ("position",),
                ),
            )
            if speculative
            else None
        )
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens processed")
        self._prompt_cached = counter("prompt_tokens_cached", "Prompt tokens taken from the cache")
        self._generation_tokens = counter("generation_tokens", "Tokens generated")
        self._success = counter("request_success", "Finished requests", ("finished_reason",))
        self._ttft = histogram(
            "time_to_first_token_seconds", "Time to first token", _LATENCY_BUCKETS
        )
        self._itl = histogram(
            "inter_token_latency_seconds", "Time between tokens", _LATENCY_BUCKETS
        )
        self._tpot = histogram(
            "time_per_output_token_seconds", "Decode time per output token", _LATENCY_BUCKETS
        )
        self._e2e = histogram("e2e_request_latency_seconds", "Arrival to finish", _LATENCY_BUCKETS)
        self._queue = histogram(
            "request_queue_time_seconds", "Arrival to first scheduling", _LATENCY_BUCKETS
        )
        self._prefill = histogram(
            "request_prefill_time_seconds", "First scheduling to first token", _LATENCY_BUCKETS
        )
        self._decode = histogram(
            "request_decode_time_seconds", "First token to the last", _LATENCY_BUCKETS
        )
        self._inference = histogram(
            "request_inference_time_seconds", "First scheduling to finish", _LATENCY_BUCKETS
        )
        self._req_prompt = histogram(
            "request_prompt_tokens", "Prompt tokens per request", _TOKEN_BUCKETS
        )
        self._req_generation = histogram(
            "request_generation_tokens", "Generated tokens per request", _TOKEN_BUCKETS
        )
        self._iteration = histogram(
            "iteration_tokens_total", "Tokens run through the model per step", _TOKEN_BUCKETS
        )
        self._params_n = histogram("request_params_n", "The n of each request", _N_BUCKETS)
        self._params_max_tokens = histogram(
            "request_params_max_tokens", "The max_tokens of each request", _TOKEN_BUCKETS
        )
        self._max_generation = histogram(
            "request_max_num_generation_tokens", "Most tokens a request may generate",
            _TOKEN_BUCKETS,
        )  # fmt: skip
        self._model_name = model_name
        self._num_engines = num_engines
        self.record_sleep(0)
        self._timings: dict[str, _Timing] = {}
        self._finished: dict[str, _Timing] = {}  # finished in the last step, for request_metrics
        self._last_stats: dict[int, SchedulerStats] = {}  # each core's, as of its last report
        self._interval = _Interval()

    def _label(self, engine: int) -> dict[str, str]:
        return {"model_name": self._model_name, "engine": str(engine)}

    def record_params(self, n: int, max_tokens: int | None, engine: int = 0) -> None:
        """A request's sampling parameters, once per request (not per sample)."""
        label = self._label(engine)
        self._params_n.labels(**label).observe(n)
        if max_tokens is not None:
            self._params_max_tokens.labels(**label).observe(max_tokens)
            self._max_generation.labels(**label).observe(max_tokens)

    def record_cache_config(self, info: dict[str, str]) -> None:
        """vLLM's cache_config_info: the KV cache's settings as labels of a gauge set to 1."""
        gauge = Gauge(f"{self._prefix}:cache_config_info", "The KV cache's configuration",
                      sorted(info), registry=self.registry)  # fmt: skip
        gauge.labels(**info).set(1)

    def record_sleep(self, level: int) -> None:
        for engine in range(self._num_engines):  # every core sleeps and wakes together
            for state, value in _SLEEP_STATES.items():
                self._sleep.labels(**self._label(engine), sleep_state=state).set(
                    int(level == value)
                )

    def record_arrival(self, req_id: str, num_prompt_tokens: int, engine: int = 0) -> None:
        self._timings[req_id] = _Timing(time.time(), num_prompt_tokens, engine)

    def record_abort(self, req_id: str) -> None:
        self._timings.pop(req_id, None)

    def load_report(self) -> dict[str, float]:
        """The engine's load as of its last step, in the named metrics of vLLM's ORCA
        `endpoint-load-metrics` header."""
        stats = self._merged_stats()
        return {
            "kv_cache_usage_perc": float(stats.kv_cache_usage if stats else 0.0),
            "num_requests_waiting": float(stats.num_waiting if stats else 0),
        }

    def _merged_stats(self) -> SchedulerStats | None:
        return merge_stats(list(self._last_stats.values())) if self._last_stats else None

    def request_metrics(self, req_id: str) -> RequestMetrics | None:
        """A request's timeline so far, or as it finished in the last step."""
        timing = self._timings.get(req_id) or self._finished.get(req_id)
        return None if timing is None else timing.snapshot()

    def record_step(
        self, outputs: list[EngineCoreOutput], stats: SchedulerStats, engine: int = 0
    ) -> None:
        now = time.time()
        self._finished.clear()
        for out in outputs:
            timing = self._timings.get(out.req_id)
            if timing is None:
                continue
            if out.new_token_ids:
                self._record_tokens(timing, out, now)
            elif out.pooled is not None:
                self._record_pooled(timing, out, now)
            if out.finish_reason is not None:  # with no token too: aborted or failed
                self._finish(out.req_id, out.finish_reason, now)
        if stats.num_step_tokens:
            self._iteration.labels(**self._label(engine)).observe(stats.num_step_tokens)
        self.record_stats(stats, engine)

    def _record_tokens(self, timing: _Timing, out: EngineCoreOutput, now: float) -> None:
        num_new = len(out.new_token_ids)
        label = self._label(timing.engine)
        if timing.last_token is None:
            timing.first_token = now
            self._ttft.labels(**label).observe(now - timing.arrival)
            if out.first_scheduled_time is not None:
                timing.scheduled = max(out.first_scheduled_time, timing.arrival)
                self._queue.labels(**label).observe(timing.scheduled - timing.arrival)
                self._prefill.labels(**label).observe(now - timing.scheduled)
            computed = timing.num_prompt_tokens - out.num_cached_tokens
            self._prompt_tokens.labels(**label).inc(computed)
            self._prompt_cached.labels(**label).inc(out.num_cached_tokens)
            self._interval.prompt_tokens += computed
        else:
            self._itl.labels(**label).observe((now - timing.last_token) / num_new)
        timing.last_token = now
        timing.num_generated += num_new
        self._generation_tokens.labels(**label).inc(num_new)
        self._interval.generation_tokens += num_new

    def _record_pooled(self, timing: _Timing, out: EngineCoreOutput, now: float) -> None:
        """A pooling request, done in one step: its prompt tokens, queue and prefill times (it
        has no first token, so no TTFT)."""
        label = self._label(timing.engine)
        if out.first_scheduled_time is not None:
            timing.scheduled = max(out.first_scheduled_time, timing.arrival)
            self._queue.labels(**label).observe(timing.scheduled - timing.arrival)
            self._prefill.labels(**label).observe(now - timing.scheduled)
        self._prompt_tokens.labels(**label).inc(timing.num_prompt_tokens)
        self._interval.prompt_tokens += timing.num_prompt_tokens

    def _finish(self, req_id: str, reason: FinishReason, now: float) -> None:
        timing = self._finished[req_id] = self._timings.pop(req_id)
        label = self._label(timing.engine)
        self._success.labels(**label, finished_reason=reason.value).inc()
        self._e2e.labels(**label).observe(now - timing.arrival)
        self._req_prompt.labels(**label).observe(timing.num_prompt_tokens)
        self._req_generation.labels(**label).observe(timing.num_generated)
        if timing.first_token is not None and timing.last_token is not None:
            self._decode.labels(**label).observe(timing.last_token - timing.first_token)
            if timing.num_generated > 1:
                per_token = (timing.last_token - timing.first_token) / (timing.num_generated - 1)
                self._tpot.labels(**label).observe(per_token)
        if timing.scheduled is not None:
            self._inference.labels(**label).observe(now - timing.scheduled)

    def record_stats(self, stats: SchedulerStats, engine: int = 0) -> None:
        """A core's snapshot: its gauges as they are, its counters by what they rose since its
        last (a core that died reports zeros: its gauges drop, its counters stay)."""
        label = self._label(engine)
        self._running.labels(**label).set(stats.num_running)
        self._waiting.labels(**label).set(stats.num_waiting)
        self._kv_usage.labels(**label).set(stats.kv_cache_usage)
        if self._gpu_cache_usage is not None:
            self._gpu_cache_usage.labels(**label).set(stats.kv_cache_usage)
        last = self._last_stats.get(engine)
        counters = [
            (self._cache_queries, "prefix_cache_queries"),
            (self._cache_hits, "prefix_cache_hits"),
            (self._preemptions, "num_preemptions"),
            (self._mm_queries, "mm_cache_queries"),
            (self._mm_hits, "mm_cache_hits"),
        ]
        if self._spec is not None:
            drafts, draft_tokens, accepted, per_pos = self._spec
            counters += [
                (drafts, "spec_num_drafts"),
                (draft_tokens, "spec_num_draft_tokens"),
                (accepted, "spec_num_accepted_tokens"),
            ]
            before = last.spec_accepted_per_pos if last else []
            for pos, count in enumerate(stats.spec_accepted_per_pos):
                done = before[pos] if pos < len(before) else 0
                per_pos.labels(**label, position=str(pos)).inc(max(count - done, 0))
        for counter, name in counters:
            rise = getattr(stats, name) - (getattr(last, name) if last else 0)
            counter.labels(**label).inc(max(rise, 0))
        self._last_stats[engine] = stats

    def log_interval(self) -> None:
        """One line of throughput and cache state, when anything happened since the last."""
        interval, self._interval = self._interval, _Interval()
        stats = self._merged_stats()
        busy = stats is not None and (stats.num_running or stats.num_waiting)
        if not busy and not interval.generation_tokens:
            return
        elapsed = max(time.monotonic() - interval.start, 1e-9)
        hit_rate = (
            100.0 * stats.prefix_cache_hits / stats.prefix_cache_queries
            if stats and stats.prefix_cache_queries
            else 0.0
        )
        spec = ""
        if self._spec is not None and stats and stats.spec_num_draft_tokens:
            rate = 100.0 * stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens
            spec = f", draft acceptance rate: {rate:.1f}%"
        logger.info(
            "running: %d, waiting: %d, KV cache usage: %.1f%%, prompt: %.1f tok/s, "
            "generation: %.1f tok/s, prefix cache hit rate: %.1f%%%s",
            stats.num_running if stats else 0,
            stats.num_waiting if stats else 0,
            100.0 * (stats.kv_cache_usage if stats else 0.0),
            interval.prompt_tokens / elapsed,
            interval.generation_tokens / elapsed,
            hit_rate,
            spec,
        )
