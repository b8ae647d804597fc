"""OpenTelemetry traces of requests (vLLM's --otlp-traces-endpoint): the W3C trace context a
client sent, carried to the engine; one span per request, exported over OTLP."""
