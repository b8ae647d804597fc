"""`lmserve serve` (OpenAI-compatible server), `lmserve chat` (terminal chat over the offline
engine) and `lmserve bench throughput`."""

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


def _serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server: engine core in its own process, uvicorn in this one."""
    import asyncio
    import os

    api_key = args.api_key or os.environ.get("LMSERVE_API_KEY")
    return asyncio.run(_run_server(args, api_key))


async def _run_server(args: argparse.Namespace, api_key: str | None) -> int:
    import uvicorn

    from lmserve.api.app import build_app
    from lmserve.api.serving.common import ServingConfig
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.models.source import DEFAULT_MODEL

    engine = await AsyncEngine.start(args.model, **engine_kwargs_from_cli(args))
    try:
        names = args.served_model_name or [args.model or DEFAULT_MODEL]
        chat_template = _read_chat_template(args.chat_template)
        app = build_app(
            engine,
            ServingConfig(names, response_role=args.response_role, chat_template=chat_template),
            api_key=api_key,
            allowed_origins=args.allowed_origins,
            disable_docs=args.disable_fastapi_docs,
            root_path=args.root_path,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=30,
        )
        print(f"lmserve: serving {names[0]} on http://{args.host}:{args.port}/v1", flush=True)
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown()
    return 0


def _read_chat_template(value: str | None) -> str | None:
    """--chat-template takes a file path or the Jinja template itself."""
    from pathlib import Path

    if value is None:
        return None
    path = Path(value)
    return path.read_text() if path.is_file() else value


def _add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 to expose)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--api-key", default=None, help="require this bearer key on /v1/* (or LMSERVE_API_KEY)"
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model names clients may use (the first is reported); default: the model argument",
    )
    parser.add_argument(
        "--chat-template", default=None, help="Jinja chat template: a file or the template itself"
    )
    parser.add_argument(
        "--response-role", default="assistant", help="role of the generated chat message"
    )
    parser.add_argument(
        "--allowed-origins", nargs="*", default=None, help="CORS origins allowed (default: none)"
    )
    parser.add_argument("--root-path", default="", help="path prefix behind a proxy")
    parser.add_argument(
        "--disable-fastapi-docs", action="store_true", help="no /docs, /redoc or /openapi.json"
    )
    parser.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level",
    )


def build_parser() -> argparse.ArgumentParser:
    from lmserve.benchmarks import throughput

    parser = argparse.ArgumentParser(
        prog="lmserve", description="LLM inference: offline engine, chat and benchmarks."
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    add_engine_cli_args(serve)
    _add_server_args(serve)
    serve.set_defaults(func=_serve)
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
