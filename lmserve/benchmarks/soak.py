"""Soak run: mixed traffic (chat, completions, streams, JSON schema, tools, clients that hang up
mid-stream) at a fixed concurrency for a while, sampling the anonymous memory (RssAnon + VmSwap,
from /proc: a leak shows there, not in page-cache-backed RSS) of the server process and of each
process under it (the engine core). One JSON line: requests and errors by kind, and each
process's memory after the warm-up, at the end and at its peak. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
}
_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
KINDS = ("chat", "completion", "chat_stream", "completion_stream", "json_schema", "tools",
         "disconnect")  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--server-pid", type=int, required=True, help="pid of `lmserve serve`")
    parser.add_argument("--duration-s", type=float, default=600, help="how long to run")
    parser.add_argument("--warmup-s", type=float, default=60, help="memory is compared from here")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens each may generate")
    parser.add_argument("--sample-s", type=float, default=5, help="seconds between samples")


def anon_kib(pid: int) -> int | None:
    """RssAnon + VmSwap of a process, in KiB; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return sum(int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "VmSwap"))


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (by parent pid, from /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(text.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


async def _request(
    client: httpx.AsyncClient, model: str, kind: str, n: int, max_tokens: int
) -> None:
    """One request of `kind`; raises on anything but a full, well-formed answer."""
    chat = {
        "model": model,
        "messages": [{"role": "user", "content": f"Tell me fact number {n} about cities."}],
        "max_tokens": max_tokens,
    }
    completion = {"model": model, "prompt": f"Fact {n}: the city of", "max_tokens": max_tokens}
    if kind in ("chat", "json_schema", "tools"):
        if kind == "json_schema":
            spec = {"name": "city", "schema": _SCHEMA}
            chat["response_format"] = {"type": "json_schema", "json_schema": spec}
        if kind == "tools":
            chat["tools"] = [_WEATHER]
        answer = await client.post("/v1/chat/completions", json=chat)
        answer.raise_for_status()
        if kind == "json_schema" and answer.json()["choices"][0]["finish_reason"] == "stop":
            json.loads(answer.json()["choices"][0]["message"]["content"])
    elif kind == "completion":
        (await client.post("/v1/completions", json=completion)).raise_for_status()
    else:
        path, body = (
            ("/v1/completions", completion)
            if kind == "completion_stream"
            else ("/v1/chat/completions", chat)
        )
        async with client.stream("POST", path, json={**body, "stream": True}) as answer:
            answer.raise_for_status()
            last = ""
            async for line in answer.aiter_lines():
                if line.startswith("data: "):
                    last = line
                    if kind == "disconnect":
                        return  # hang up after the first event
            if last != "data: [DONE]":
                raise RuntimeError(f"the stream ended with {last!r}")


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    done: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    samples: list[str] = []
    kinds = itertools.cycle(KINDS)
    numbers = itertools.count()
    deadline = time.monotonic() + args.duration_s
    async with httpx.AsyncClient(base_url=args.base_url, timeout=300, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]

        async def worker() -> None:
            while time.monotonic() < deadline:
                kind = next(kinds)
                try:
                    await _request(client, model, kind, next(numbers), args.max_tokens)
                    done[kind] += 1
                except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                    errors[kind] += 1
                    if len(samples) < 5:
                        samples.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])

        memory = asyncio.create_task(_sample_memory(args, deadline))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        series = await memory
    return {
        "bench": "soak",
        "duration_s": args.duration_s,
        "concurrency": args.concurrency,
        "requests": dict(done),
        "errors": dict(errors),
        "error_samples": samples,
        "memory_mib": {name: _growth(values, args) for name, values in series.items()},
    }


async def _sample_memory(
    args: argparse.Namespace, deadline: float
) -> dict[str, list[tuple[float, int]]]:
    """Each process's (seconds since start, KiB) every sample_s, named api / child-<pid>."""
    start = time.monotonic()
    series: dict[str, list[tuple[float, int]]] = {}
    while time.monotonic() < deadline:
        now = time.monotonic() - start
        for pid in [args.server_pid, *descendants(args.server_pid)]:
            kib = anon_kib(pid)
            if kib is not None and kib > 10 * 1024:  # not a short-lived helper
                name = "api" if pid == args.server_pid else f"child-{pid}"
                series.setdefault(name, []).append((now, kib))
        await asyncio.sleep(args.sample_s)
    return series


def _growth(values: list[tuple[float, int]], args: argparse.Namespace) -> dict[str, float]:
    warm = next((kib for t, kib in values if t >= args.warmup_s), values[-1][1])
    end = values[-1][1]
    return {
        "after_warmup": round(warm / 1024, 1),
        "end": round(end / 1024, 1),
        "peak": round(max(kib for _, kib in values) / 1024, 1),
        "growth_pct": round(100 * (end - warm) / warm, 2),
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(_run(args))
    print(json.dumps(result))
    return result
