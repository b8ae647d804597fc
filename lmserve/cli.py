"""`lmserve chat` (terminal chat over the offline engine) and `lmserve bench throughput`."""

from __future__ import annotations

import argparse
import logging
import sys

from lmserve.engine.args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli


def _chat(args: argparse.Namespace) -> int:
    """Read a line, answer it with the whole conversation as context; /reset, /exit."""
    from lmserve import LLM, SamplingParams

    llm = LLM(args.model, **engine_kwargs_from_cli(args))
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
    chat.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_engine_cli_args(chat)
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
