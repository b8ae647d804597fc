"""--otlp-traces-endpoint end to end: a real server exports its spans over OTLP/gRPC to a
collector this test runs (opentelemetry-proto's TraceService on grpc), one `llm_request` span
per request with vLLM's latency and usage attributes, parented on the client's W3C
traceparent; and a server without the flag never loads the SDK."""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent import futures

import grpc
import openai
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.api.conftest import free_port, start_server, stop_server

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list = []

    def Export(self, request, context):  # noqa: N802 - the gRPC service's method name
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def collector():
    port = free_port()
    service = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield port, service
    server.stop(grace=None)


def attributes(span) -> dict:
    out = {}
    for kv in span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_one_span_per_request_parented_on_the_clients_trace(tiny_model_dirs, collector) -> None:
    port, service = collector
    server = start_server(
        str(tiny_model_dirs["llama"]), "--served-model-name", "tiny", "--kv-cache-memory-gb",
        "0.02", "--otlp-traces-endpoint", f"http://127.0.0.1:{port}",
        env={"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    )  # fmt: skip
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        traced = client.completions.create(
            model="tiny", prompt=[3, 4, 5, 6, 7], max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True},
            extra_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )  # fmt: skip
        stream = client.completions.create(
            model="tiny", prompt=[8, 9, 10], max_tokens=4, stream=True
        )
        assert list(stream)
        deadline = time.monotonic() + 15
        while len(service.spans) < 2:
            assert time.monotonic() < deadline, service.spans
            time.sleep(0.1)
    finally:
        stop_server(server)
    assert len(service.spans) == 2  # one per request
    first = next(s for s in service.spans if s.trace_id.hex() == TRACE_ID)
    assert first.name == "llm_request" and first.parent_span_id.hex() == PARENT_ID
    assert first.kind == 2  # SERVER
    attrs = attributes(first)
    assert attrs["gen_ai.usage.prompt_tokens"] == 5
    assert attrs["gen_ai.usage.completion_tokens"] == traced.usage.completion_tokens == 6
    assert attrs["gen_ai.response.model"] == "tiny" and attrs["gen_ai.request.max_tokens"] == 6
    for name in ("time_in_queue", "time_to_first_token", "time_in_model_prefill",
                 "time_in_model_decode", "time_in_model_inference", "e2e"):  # fmt: skip
        assert attrs[f"gen_ai.latency.{name}"] >= 0, name
    assert attrs["gen_ai.latency.e2e"] >= attrs["gen_ai.latency.time_to_first_token"]
    assert (first.end_time_unix_nano - first.start_time_unix_nano) / 1e9 == pytest.approx(
        attrs["gen_ai.latency.e2e"], abs=1e-3
    )
    other = next(s for s in service.spans if s is not first)
    assert other.trace_id.hex() != TRACE_ID and not other.parent_span_id  # a trace of its own


def test_tracing_off_loads_no_sdk() -> None:
    code = (
        "import sys, lmserve.api.app, lmserve.engine.async_engine; "
        "print(any(m.startswith('opentelemetry.sdk') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
