"""`lmserve chat` (terminal chat over the offline engine) and `lmserve bench throughput`."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine arguments, with vLLM's flag names and meanings."""
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="HF model directory, .gguf file, or HF id in the local cache "
        "(default: the bundled SmolLM2-135M-Instruct)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="weights and activations dtype; auto = float32 on CPU, the config's dtype on CUDA",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=256, help="most requests running at once"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens computed per step; longer prompts are prefilled in chunks (default 2048)",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV cache size on CPU in GiB (default 2)",
    )
    parser.add_argument(
        "--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides memory)"
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="dummy = random weights with the model's real shapes (benchmarks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        load_format=args.load_format,
        seed=args.seed,
    )


def _chat(args: argparse.Namespace) -> int:
    """Read a line, answer it with the whole conversation as context; /reset, /exit."""
    from lmserve import LLM, SamplingParams

    llm = LLM(args.model, **_engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("lmserve chat: type a message; /reset clears the conversation, /exit or Ctrl-D quits.")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            del messages[1 if args.system else 0 :]
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def build_parser() -> argparse.ArgumentParser:
    from lmserve.benchmarks import throughput

    parser = argparse.ArgumentParser(
        prog="lmserve", description="LLM inference: offline engine, chat and benchmarks."
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="interactive terminal chat with a model")
    _add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    chat.add_argument("--max-tokens", type=int, default=512, help="longest answer in tokens")
    chat.set_defaults(func=_chat)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(
        dest="bench", required=True
    )
    tput = bench.add_parser(
        "throughput", help="offline throughput of N prompts, optionally beside HF transformers"
    )
    throughput.add_arguments(tput)
    tput.set_defaults(func=lambda args: (throughput.main(args), 0)[1])
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"lmserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
