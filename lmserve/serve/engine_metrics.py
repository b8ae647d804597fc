"""A replica's engine metrics on Ray's Prometheus port (LLMConfig.log_engine_metrics), as Ray
Serve LLM exports vLLM's: every `lmserve:*` series, mirrored as a Ray gauge named
`lmserve_*` (Ray adds its `ray_` prefix), tagged with the series' labels.

Counters and histogram buckets are mirrored at their current cumulative values, so rate() and
histogram_quantile() read them as they read the single server's /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry
from ray.util.metrics import Gauge


class RayMetricsMirror:
    def __init__(self, registry: CollectorRegistry, interval_s: float = 1.0) -> None:
        self._registry = registry
        self._interval_s = interval_s
        self._gauges: dict[str, Gauge] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self.mirror()
            await asyncio.sleep(self._interval_s)

    def mirror(self) -> None:
        """Set every sample's gauge to its value now."""
        for family in self._registry.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):  # prometheus_client's creation stamps
                    continue
                name = sample.name.replace(":", "_")
                gauge = self._gauges.get(name)
                if gauge is None:
                    gauge = Gauge(name, family.documentation, tuple(sorted(sample.labels)))
                    self._gauges[name] = gauge
                gauge.set(sample.value, tags=dict(sample.labels))
