"""One `llm_request` span per finished request, with vLLM's attribute names, exported over
OTLP (gRPC, or HTTP with OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf). Imported only when
tracing is on: a server without --otlp-traces-endpoint never loads the SDK."""

from __future__ import annotations

from dataclasses import dataclass

from lmserve.outputs import RequestMetrics

try:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - the SDK ships with lmserve's dependencies
    raise ValueError(
        "--otlp-traces-endpoint needs the OpenTelemetry SDK and an OTLP exporter: "
        "pip install opentelemetry-sdk opentelemetry-exporter-otlp"
    ) from exc


@dataclass(frozen=True)
class TracedRequest:
    """What a finished request's span says."""

    request_id: str
    model: str
    headers: dict[str, str] | None
    timeline: RequestMetrics
    finished: float  # wall clock
    num_prompt_tokens: int
    num_completion_tokens: int
    num_sequences: int
    n: int
    max_tokens: int | None
    temperature: float
    top_p: float


class RequestTracer:
    def __init__(self, endpoint: str, protocol: str) -> None:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be grpc or http/protobuf, got {protocol!r}"
            )
        self._provider = TracerProvider(resource=Resource.create({"service.name": "lmserve"}))
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("lmserve")
        self._propagator = TraceContextTextMapPropagator()

    def record(self, request: TracedRequest) -> None:
        timeline = request.timeline
        parent = self._propagator.extract(request.headers) if request.headers else None
        span = self._tracer.start_span(
            "llm_request",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=_ns(timeline.arrival_time),
        )
        attributes: dict[str, str | int | float] = {
            "gen_ai.request.id": request.request_id,
            "gen_ai.response.model": request.model,
            "gen_ai.request.n": request.n,
            "gen_ai.request.temperature": request.temperature,
            "gen_ai.request.top_p": request.top_p,
            "gen_ai.usage.prompt_tokens": request.num_prompt_tokens,
            "gen_ai.usage.completion_tokens": request.num_completion_tokens,
            "gen_ai.usage.num_sequences": request.num_sequences,
            "gen_ai.latency.e2e": request.finished - timeline.arrival_time,
        }
        if request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        scheduled, first, last = (
            timeline.scheduled_time,
            timeline.first_token_time,
            timeline.last_token_time,
        )
        if scheduled is not None:
            attributes["gen_ai.latency.time_in_queue"] = scheduled - timeline.arrival_time
            attributes["gen_ai.latency.time_in_model_inference"] = request.finished - scheduled
        if first is not None:
            attributes["gen_ai.latency.time_to_first_token"] = first - timeline.arrival_time
            if scheduled is not None:
                attributes["gen_ai.latency.time_in_model_prefill"] = first - scheduled
            if last is not None:
                attributes["gen_ai.latency.time_in_model_decode"] = last - first
        span.set_attributes(attributes)
        span.end(end_time=_ns(request.finished))

    def shutdown(self) -> None:
        """Export what is still queued, then stop."""
        self._provider.shutdown()


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
