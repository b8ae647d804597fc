"""Online serving benchmark, like `vllm bench serve`: stream completions from a running
OpenAI-compatible server (lmserve or any other) and report latency percentiles and throughput.
`--peer llama-server` then starts llama.cpp's own server on a GGUF file (the same file lmserve
serves), sends it the same requests, stops it, and reports both with their ratios.

TTFT is request start to the first streamed text; ITL the gaps between later chunks; TPOT the
decode time per output token after the first; E2E request start to the last byte.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# where llama.cpp's build (../shared/tools/build-llama-server.sh) leaves the peers' binaries
LLAMA_CPP_BIN = Path("~/.cache/lmserve-peers/llama.cpp/build/bin").expanduser()
_LLAMA_SERVER = LLAMA_CPP_BIN / "llama-server"


@dataclass
class Result:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's URL")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests to send")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (random text)")
    parser.add_argument("--output-len", type=int, default=128, help="tokens to generate each")
    parser.add_argument(
        "--dataset", type=Path, default=None, help='JSONL of {"prompt": str}; overrides input-len'
    )
    parser.add_argument(
        "--dataset-name",
        choices=["random", "code-edit"],
        default="random",
        help="random: --input-len random tokens; code-edit: 'add type hints to this function' "
        "requests in the tokenizer's chat template, whose answers repeat most of their prompt "
        "(where n-gram speculative decoding pays)",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="most requests in flight at once"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests per second, Poisson arrivals (default: all at once)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="model whose tokenizer makes the random prompts (default: the bundled SmolLM2); "
        "a shipped shape's name (Llama-3-8B) for a server of that shape with --load-format dummy",
    )
    parser.add_argument("--api-key", default=None, help="bearer key for the server")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals")
    parser.add_argument("--label", default=None, help="name of the server in the JSON line")
    parser.add_argument(
        "--peer",
        choices=["none", "llama-server"],
        default="none",
        help="llama-server: after the server at --base-url, run the same requests on llama.cpp's "
        "server (started here on --peer-model, one slot per concurrent request) and report both",
    )
    parser.add_argument(
        "--peer-binary",
        type=Path,
        default=_LLAMA_SERVER,
        help="the llama-server executable (llama.cpp's; build it with cmake --target "
        f"llama-server; default: {_LLAMA_SERVER})",
    )
    parser.add_argument(
        "--peer-model",
        type=Path,
        default=None,
        help="the GGUF file llama-server runs (default: the bundled SmolLM2 Q4_1 file, the one "
        "`lmserve serve` serves by default)",
    )
    parser.add_argument(
        "--peer-threads", type=int, default=2, help="llama-server's -t and -tb (CPU threads)"
    )
    parser.add_argument(
        "--peer-context", type=int, default=1024, help="llama-server's context per slot"
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    prompts = _prompts(args)
    result = asyncio.run(_run(args, prompts))
    if args.peer == "llama-server":
        peer = _run_llama_server(args, prompts)
        result = {
            "lmserve": result,
            "llama-server": peer,
            "output_tok_per_s_ratio": _ratio(result["output_tok_per_s"], peer["output_tok_per_s"]),
            # one stream's decode speed: time per output token after the first
            "decode_tok_per_s_ratio": _ratio(peer["tpot_ms"]["p50"], result["tpot_ms"]["p50"]),
            "ttft_p50_ratio": _ratio(result["ttft_ms"]["p50"], peer["ttft_ms"]["p50"]),
        }
    print(json.dumps(result), flush=True)
    return result


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _run_llama_server(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """llama.cpp's server on the same machine, one slot per request in flight, the same
    prompts; stopped before this returns."""
    if not args.peer_binary.exists():
        raise SystemExit(
            f"no llama-server at {args.peer_binary}: build llama.cpp's server (cmake --build "
            "build --target llama-server) and pass --peer-binary"
        )
    model = args.peer_model
    if model is None:
        from lmserve.models.gguf import bundled_smollm2_gguf

        model = bundled_smollm2_gguf()
    slots = args.max_concurrency or len(prompts)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        str(args.peer_binary), "-m", str(model), "-t", str(args.peer_threads),
        "-tb", str(args.peer_threads), "-np", str(slots), "-c", str(slots * args.peer_context),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", proc)
        peer = argparse.Namespace(**{**vars(args), "base_url": f"http://127.0.0.1:{port}"})
        peer.label, peer.model, peer.api_key = "llama-server", None, None
        return asyncio.run(_run(peer, prompts))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llama-server exited with status {proc.returncode} while loading")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"llama-server did not answer {url}/health in {timeout_s:.0f} s")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    return main(parser.parse_args(argv))


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.dataset is not None:
        lines = args.dataset.read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines if line.strip()][: args.num_prompts]
    from lmserve.benchmarks.shapes import resolve_model
    from lmserve.config import default_cache_dir
    from lmserve.engine.tokenizer import load_tokenizer
    from lmserve.models.source import resolve_model_dir

    cache_dir = default_cache_dir()
    tokenizer_dir = resolve_model_dir(resolve_model(args.tokenizer, cache_dir), cache_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    rng = np.random.default_rng(args.seed)
    if args.dataset_name == "code-edit":
        return [_code_edit_prompt(tokenizer, rng) for _ in range(args.num_prompts)]
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(tokenizer.vocab_size, 32000)) if i not in special]
    return [
        tokenizer.decode(rng.choice(vocab, size=args.input_len).tolist())
        for _ in range(args.num_prompts)
    ]


_NAMES = ["total", "count", "width", "height", "price", "rate", "offset", "limit", "score", "step"]
_OPS = ["+", "-", "*", "//", "%"]


def _code_edit_prompt(tokenizer: Any, rng: np.random.Generator) -> str:
    """A random small Python function and the request to add type hints to it, keeping the
    rest: a code edit, whose answer is mostly its input."""
    a, b, c = rng.choice(_NAMES, size=3, replace=False).tolist()
    name = f"{rng.choice(['compute', 'update', 'scale', 'merge'])}_{a}_{b}"
    lines = [f"def {name}({a}, {b}, {c}=1):", f'    """Combine {a} and {b}, step by {c}."""']
    for i in range(int(rng.integers(4, 8))):
        x, y = rng.choice([a, b, c], size=2).tolist()
        op = rng.choice(_OPS)
        lines.append(f"    {x} = {x} {op} {y} + {int(rng.integers(1, 10))}")
        if i % 2:
            lines.append(f"    if {x} > {int(rng.integers(10, 100))}:\n        {x} = {y}")
    lines.append(f"    return {a} {rng.choice(_OPS)} {b}")
    text = "Add type hints to this Python function. Change nothing else:\n\n" + "\n".join(lines)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return text + "\n\nWith type hints:\n\n"


async def _run(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # a fresh connection per request: llama-server closes a kept-alive one after a few
    # requests, which the next request on it would see as a failure
    limits = httpx.Limits(
        max_connections=args.max_concurrency or len(prompts), max_keepalive_connections=0
    )
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=None, limits=limits
    ) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))
        rng = np.random.default_rng(args.seed + 1)
        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(_one(client, gate, model, prompt, args.output_len)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return _summary(args, model, results, duration)


async def _one(
    client: Any, gate: asyncio.Semaphore, model: str, prompt: str, output_len: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    result = Result()
    async with gate:
        start = last = time.perf_counter()
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    result.error = f"HTTP {response.status_code}: {await response.aread()!r}"
                    return result
                chunks = 0
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    now = time.perf_counter()
                    if data.get("usage"):
                        result.output_tokens = data["usage"]["completion_tokens"]
                    if data.get("choices") and data["choices"][0].get("text"):
                        chunks += 1
                        if chunks == 1:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
                result.e2e = time.perf_counter() - start
                result.output_tokens = result.output_tokens or chunks
                result.ok = chunks > 0
        except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
            result.error = repr(exc)
    return result


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    arr = np.asarray(values) * 1000.0
    return {
        "mean": round(float(arr.mean()), 2),
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
    }


def _summary(
    args: argparse.Namespace, model: str, results: list[Result], duration: float
) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "server": args.label or args.base_url,
        "model": model,
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "first_error": next((r.error for r in results if r.error), None),
        "max_concurrency": args.max_concurrency,
        "request_rate": None if args.request_rate == float("inf") else args.request_rate,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "duration_s": round(duration, 3),
        "requests_per_s": round(len(done) / duration, 3),
        "total_output_tokens": output_tokens,
        "output_tok_per_s": round(output_tokens / duration, 2),
        "ttft_ms": _stats([r.ttft for r in done]),
        "itl_ms": _stats([x for r in done for x in r.itl]),
        "tpot_ms": _stats(tpot),
        "e2e_ms": _stats([r.e2e for r in done]),
    }
