"""Every replica's engine metrics, for the router's /metrics and /dashboard: read back from each
Ray node's Prometheus endpoint, where log_engine_metrics mirrors them as `ray_lmserve_*`
(engine_metrics.py), and renamed to the `lmserve:*` names `lmserve serve` gives them.

Ray reports them every 10 s (its metrics_report_interval_ms), so the dashboard computes its rates
over DASHBOARD_WINDOW_S rather than from one second to the next.
"""

from __future__ import annotations

import asyncio

import httpx
import ray

from lmserve.engine.args import METRICS_PREFIXES

DASHBOARD_WINDOW_S = 12.0  # Ray's 10 s report interval, and some slack
_TIMEOUT_S = 2.0


async def cluster_metrics_text() -> str:
    """The engine series of every alive node's Prometheus endpoint (a node that does not
    answer in time is left out), in Prometheus' text format."""
    nodes = await asyncio.to_thread(ray.nodes)
    urls = [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in nodes
        if node.get("Alive") and node.get("MetricsExportPort")
    ]
    async with httpx.AsyncClient(timeout=_TIMEOUT_S) as client:
        replies = await asyncio.gather(*(client.get(url) for url in urls), return_exceptions=True)
    lines: list[str] = []
    typed: set[str] = set()
    for reply in replies:
        if isinstance(reply, BaseException) or reply.status_code != 200:
            continue
        for line in reply.text.splitlines():
            renamed = _engine_series(line)
            if renamed is None:
                continue
            if renamed.startswith("#"):  # one HELP / TYPE line per series across the nodes
                key = renamed.split(" ", 3)[:3]
                if tuple(key) in typed:
                    continue
                typed.add(tuple(key))
            lines.append(renamed)
    return "\n".join(lines) + "\n"


def _engine_series(line: str) -> str | None:
    """`line` with its `ray_<prefix>_` name given back its `<prefix>:` form; None for any
    other series."""
    for prefix in METRICS_PREFIXES:
        ray_name = f"ray_{prefix}_"
        if line.startswith(ray_name):
            return f"{prefix}:" + line[len(ray_name) :]
        for comment in ("# HELP ", "# TYPE "):
            if line.startswith(comment + ray_name):
                return f"{comment}{prefix}:" + line[len(comment + ray_name) :]
    return None
