"""The HTTP side's own Prometheus metrics: what the edge answered with an error, by route."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class HTTPMetrics:
    """Owned by the app that mounts the edge; `/metrics` shows it beside the engine's."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._errors = Counter(
            "lmserve:http_errors",
            "Requests answered with an error status (4xx: the request's fault, 5xx: ours)",
            ["status", "route"],
            registry=self.registry,
        )

    def record_error(self, status: int, route: str) -> None:
        self._errors.labels(status=str(status), route=route).inc()
