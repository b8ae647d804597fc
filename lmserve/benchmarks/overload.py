"""Overload run: many chat requests at once against a server with a bounded queue
(`--max-num-seqs`, `--max-num-queued-reqs`). Each must be answered, with a 200 or a 503 that
carries Retry-After, none left for the client to time out; right after, a normal request must be
served. One JSON line: the answers by status, their latencies, and the request after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from typing import Any

import httpx
import numpy as np

_MESSAGES = [{"role": "user", "content": "Count from one to twenty in words."}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--num-requests", type=int, default=200, help="requests sent at once")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens each may generate")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds a client waits for its answer"
    )
    parser.add_argument("--api-key", default=None, help="bearer key for the server")


async def _one(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[str, float, bool]:
    """(status or 'timeout'/'error', seconds, whether a 503 said when to come back)."""
    start = time.monotonic()
    try:
        answer = await client.post("/v1/chat/completions", json=body)
    except httpx.TimeoutException:
        return "timeout", time.monotonic() - start, False
    except httpx.HTTPError as exc:
        return f"error:{type(exc).__name__}", time.monotonic() - start, False
    return str(answer.status_code), time.monotonic() - start, "retry-after" in answer.headers


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.num_requests + 1)
    async with httpx.AsyncClient(
        base_url=args.base_url, timeout=args.timeout, limits=limits, headers=headers
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": _MESSAGES, "max_tokens": args.max_tokens}
        start = time.monotonic()
        answers = await asyncio.gather(*(_one(client, body) for _ in range(args.num_requests)))
        wall = time.monotonic() - start
        after = await _one(client, body)
    statuses = Counter(status for status, _, _ in answers)

    def latencies(status: str) -> dict[str, float] | None:
        seconds = [s for code, s, _ in answers if code == status]
        if not seconds:
            return None
        return {
            "p50_s": round(float(np.percentile(seconds, 50)), 3),
            "max_s": round(max(seconds), 3),
        }

    return {
        "bench": "overload",
        "requests": args.num_requests,
        "statuses": dict(sorted(statuses.items())),
        "503_with_retry_after": sum(code == "503" and retry for code, _, retry in answers),
        "timeouts": statuses.get("timeout", 0),
        "latency_200": latencies("200"),
        "latency_503": latencies("503"),
        "wall_s": round(wall, 2),
        "after": {"status": after[0], "seconds": round(after[1], 3)},
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    result = asyncio.run(_run(args))
    print(json.dumps(result))
    return result
