"""`lmserve serve` (OpenAI-compatible server), `lmserve chat` (terminal chat over the offline
engine) and `lmserve bench throughput`."""

from __future__ import annotations

import argparse
import logging
import sys

from lmserve.api.tool_parsers import TOOL_PARSERS
from lmserve.engine.cli_args import MODEL_HELP, add_engine_cli_args, engine_kwargs_from_cli


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


def _run(args: argparse.Namespace) -> int:
    """Ray Serve deployment of a YAML config: lmserve.serve's builders on a local or running Ray."""
    from pathlib import Path

    from lmserve.serve.run import run

    return run(Path(args.config))


def _serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server: engine core in its own process, uvicorn in this one."""
    import asyncio

    from lmserve.api.auth import keys_from_env

    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME")
    if args.tool_server:
        raise ValueError(
            "--tool-server (MCP tools for the Responses API) is not supported yet: give the "
            "model function tools and call the MCP server from your client"
        )
    # as vLLM: the flag's keys, else the environment's (a vLLM deployment's VLLM_API_KEY too)
    api_keys = [key for key in args.api_key or keys_from_env() if key]
    return asyncio.run(_run_server(args, api_keys))


async def _run_server(args: argparse.Namespace, api_keys: list[str]) -> int:
    import signal

    import uvicorn

    from lmserve.api.app import CORSConfig, build_app
    from lmserve.api.errors import APIError
    from lmserve.api.serving.common import ServingConfig
    from lmserve.benchmarks.shapes import resolve_model
    from lmserve.engine.async_engine import AsyncEngine
    from lmserve.engine.generation_config import load_sampling_defaults
    from lmserve.models.source import DEFAULT_MODEL, DEFAULT_POOLING_MODEL

    # a shipped benchmark shape by name: `lmserve serve Llama-3-8B --load-format dummy`
    model = resolve_model(args.model) if args.load_format == "dummy" else args.model
    pooling = args.runner == "pooling" or args.task not in (None, "generate")
    default = DEFAULT_POOLING_MODEL if pooling else DEFAULT_MODEL
    names = args.served_model_name or [args.model or default]
    engine = await AsyncEngine.start(
        model,
        log_stats=not args.disable_log_stats,
        log_stats_interval_s=_log_stats_interval(),
        served_model_name=names[0],
        **engine_kwargs_from_cli(args),
    )
    try:
        serving = ServingConfig(
            names,
            response_role=args.response_role,
            chat_template=_read_chat_template(args.chat_template),
            chat_template_content_format=args.chat_template_content_format,
            sampling_defaults=load_sampling_defaults(engine.config.model.path)
            if args.generation_config == "auto"
            else {},
            log_requests=args.enable_log_requests and not args.disable_log_requests,
            max_log_len=args.max_log_len,
            enable_auto_tool_choice=args.enable_auto_tool_choice,
            tool_call_parser=args.tool_call_parser,
            reasoning_parser=args.reasoning_parser,
            enable_prompt_tokens_details=args.enable_prompt_tokens_details,
            enable_force_include_usage=args.enable_force_include_usage,
            enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
            return_tokens_as_token_ids=args.return_tokens_as_token_ids,
            max_num_queued_reqs=args.max_num_queued_reqs,
            max_num_queued_tokens=args.max_num_queued_tokens,
            sse_keep_alive_interval=args.sse_keep_alive_interval,
            max_request_body_mb=args.max_request_body_mb,
            max_audio_file_mb=args.max_audio_file_mb,
            max_audio_duration_s=args.max_audio_duration_s,
            trust_request_chat_template=args.trust_request_chat_template,
            max_waiting_time_s=args.max_waiting_time_s,
            enable_per_request_metrics=args.enable_per_request_metrics,
            enable_playground=not args.disable_playground,
            server_dev_mode=_env_flag("LMSERVE_SERVER_DEV_MODE")
            or _env_flag("VLLM_SERVER_DEV_MODE"),
            allow_runtime_lora_updating=_env_flag("LMSERVE_ALLOW_RUNTIME_LORA_UPDATING")
            or _env_flag("VLLM_ALLOW_RUNTIME_LORA_UPDATING"),
        )
        for name, path in _lora_modules(args.lora_modules or []):
            try:
                serving.lora_modules.add(engine, name, path)
            except APIError as exc:
                raise ValueError(f"--lora-modules {name}={path}: {exc.message}") from None
        cors = (
            CORSConfig(
                args.allowed_origins,
                args.allowed_methods,
                args.allowed_headers,
                args.allow_credentials,
            )
            if args.allowed_origins
            else None
        )
        app = build_app(
            engine,
            serving,
            api_keys=api_keys,
            cors=cors,
            request_id_headers=args.enable_request_id_headers,
            disable_docs=args.disable_fastapi_docs,
            root_path=args.root_path,
        )
        config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            uds=args.uds,
            log_level=args.uvicorn_log_level,
            timeout_graceful_shutdown=30,
            ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile,
            ssl_ca_certs=args.ssl_ca_certs,
            ssl_cert_reqs=args.ssl_cert_reqs,
            access_log=not args.disable_uvicorn_access_log,
        )
        scheme = "https" if args.ssl_certfile else "http"
        where = f"unix:{args.uds}" if args.uds else f"{scheme}://{args.host}:{args.port}"
        print(f"lmserve: serving {names[0]} on {where}/v1", flush=True)
        # uvicorn drains in-flight requests on SIGTERM/SIGINT, then re-raises the signal to the
        # handler it found: make that a no-op, so the engine below is shut down and we exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        await uvicorn.Server(config).serve()
    finally:
        await engine.shutdown()
    return 0


def _env_flag(name: str) -> bool:
    import os

    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _log_stats_interval() -> float:
    """Seconds between stats lines: LMSERVE_LOG_STATS_INTERVAL (or vLLM's
    VLLM_LOG_STATS_INTERVAL), 10 by default."""
    import os

    for name in ("LMSERVE_LOG_STATS_INTERVAL", "VLLM_LOG_STATS_INTERVAL"):
        if value := os.environ.get(name, "").strip():
            try:
                seconds = float(value)
            except ValueError:
                raise SystemExit(f"{name}={value!r}: give a number of seconds, e.g. 10") from None
            if seconds <= 0:
                raise SystemExit(f"{name}={value!r}: give a positive number of seconds")
            return seconds
    return 10.0


def _lora_modules(values: list[str]) -> list[tuple[str, str]]:
    """--lora-modules entries: `name=path`, or vLLM's JSON form {"name": ..., "path": ...}."""
    import json

    modules = []
    for value in values:
        if value.lstrip().startswith("{"):
            entry = json.loads(value)
            if not isinstance(entry, dict) or "name" not in entry or "path" not in entry:
                raise ValueError(f'--lora-modules JSON needs "name" and "path": {value}')
            modules.append((str(entry["name"]), str(entry["path"])))
        elif "=" in value:
            name, _, path = value.partition("=")
            modules.append((name, path))
        else:
            raise ValueError(f"--lora-modules takes name=path (or JSON), got {value!r}")
    return modules


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
    parser.add_argument("--ssl-keyfile", default=None, help="TLS: the server's private key file")
    parser.add_argument(
        "--ssl-certfile", default=None, help="TLS: the server's certificate file (serves HTTPS)"
    )
    parser.add_argument(
        "--ssl-ca-certs", default=None, help="TLS: CA certificates to verify client certificates"
    )
    parser.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        help="TLS: whether client certificates are required (Python ssl.CERT_*: 0 none, "
        "1 optional, 2 required)",
    )
    parser.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="require one of these keys on /v1/*, as Authorization: Bearer KEY or x-api-key: "
        "KEY (default: LMSERVE_API_KEY, else VLLM_API_KEY, from the environment)",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model names clients may use (the first is reported); default: the model argument",
    )
    parser.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT directories) served as models named NAME; also "
        'JSON: \'{"name": "sql", "path": "/adapters/sql"}\'. Needs --enable-lora. Set '
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to add and remove adapters at runtime with POST "
        "/v1/load_lora_adapter and /v1/unload_lora_adapter",
    )
    parser.add_argument(
        "--chat-template", default=None, help="Jinja chat template: a file or the template itself"
    )
    parser.add_argument(
        "--response-role", default="assistant", help="role of the generated chat message"
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide to call tools (tool_choice "auto"); needs --tool-call-parser',
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        choices=list(TOOL_PARSERS),
        help="how to read tool calls from the model's text: hermes (Qwen2.5, Hermes), "
        "llama3_json, mistral, openai (gpt-oss's harmony), pythonic (Llama 3.2/4), qwen3_xml "
        "(Qwen3-Coder)",
    )
    parser.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=["auto", "string", "openai"],
        help="how message content reaches the template: a string, or OpenAI's list of parts "
        "(auto: detected from the template)",
    )
    parser.add_argument(
        "--generation-config",
        default="auto",
        choices=["auto", "none"],
        help="auto: unset sampling fields take the model's generation_config.json values",
    )
    parser.add_argument(
        "--allowed-origins", nargs="*", default=None, help="CORS origins allowed (default: none)"
    )
    parser.add_argument("--allowed-methods", nargs="*", default=["*"], help="CORS methods allowed")
    parser.add_argument("--allowed-headers", nargs="*", default=["*"], help="CORS headers allowed")
    parser.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
    parser.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="answer with an X-Request-Id header (the client's, or a new one)",
    )
    parser.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens: prompt tokens served from the "
        "prefix cache",
    )
    parser.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help='logprobs name each token "token_id:{id}" instead of its text (for clients that '
        "must not re-tokenize text that does not decode cleanly)",
    )
    parser.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="usage on every stream, asked for or not: on each chunk and in a last one (as "
        "vLLM's flag does)",
    )
    parser.add_argument(
        "--disable-playground",
        action="store_true",
        help="leave out the built-in pages: the chat playground at / and the live metrics "
        "dashboard at /dashboard (both need no network beyond this server)",
    )
    parser.add_argument(
        "--enable-tokenizer-info-endpoint",
        action="store_true",
        help="serve GET /tokenizer_info: the tokenizer's class, settings and chat template",
    )
    parser.add_argument(
        "--enable-server-load-tracking",
        action="store_true",
        help="accepted for vLLM compatibility: /load always counts the requests in flight, and "
        "a request with an `endpoint-load-metrics-format: TEXT|JSON` header always gets the "
        "engine's load back in an ORCA `endpoint-load-metrics` header",
    )
    parser.add_argument(
        "--tool-server",
        default=None,
        help="vLLM's MCP tool servers for the Responses API: not supported yet (refused, so "
        "nobody believes their tools run)",
    )
    parser.add_argument(
        "--enable-per-request-metrics",
        action="store_true",
        help="add a `metrics` object to each answer that is one generation: time to first "
        "token, queue time, generation time, mean inter-token latency and tokens/s (on a "
        "stream: in its usage chunk)",
    )
    parser.add_argument(
        "--uds",
        default=None,
        help="listen on this Unix domain socket instead of --host/--port",
    )
    parser.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="log each request received: its prompt and sampling parameters (off by default)",
    )
    parser.add_argument(
        "--max-num-queued-reqs",
        type=int,
        default=None,
        help="most sequences in flight, running and waiting (a request with n > 1 counts n); "
        "past it a request gets 503 with Retry-After before any work is done for it "
        "(default: unbounded)",
    )
    parser.add_argument(
        "--max-num-queued-tokens",
        type=int,
        default=None,
        help="most prompt tokens waiting for prefill (sent to the engine, no token out yet); "
        "while the backlog is at it a request gets 503 with Retry-After before it is templated "
        "or tokenized. About the TTFT you accept times the prefill rate (default: unbounded)",
    )
    parser.add_argument(
        "--sse-keep-alive-interval",
        type=float,
        default=None,
        help="send an SSE comment on a stream idle for this many seconds, so proxies that drop "
        "idle connections keep it open (default: none)",
    )
    parser.add_argument(
        "--max-request-body-mb",
        type=float,
        default=32.0,
        help="largest request body, in MB; a larger one gets 413 before it is read whole "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-audio-file-mb",
        type=float,
        default=25.0,
        help="largest audio file /v1/audio/transcriptions and /translations take, in MB; a "
        "larger one gets 413 (default: %(default)s, as vLLM's VLLM_MAX_AUDIO_CLIP_FILESIZE_MB)",
    )
    parser.add_argument(
        "--max-audio-duration-s",
        type=float,
        default=1800.0,
        help="longest audio a speech model transcribes, in seconds; longer audio gets 400 "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-waiting-time-s",
        type=float,
        default=None,
        help="a request with no output token after this many seconds (queued behind others, "
        "or in a long prefill) is aborted with 503 and Retry-After, instead of holding its "
        "client (default: wait as long as it takes)",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="run a `chat_template` sent in a request body (Jinja from a client: sandboxed and "
        "stopped after 0.5 s, but still code); without it such a request gets 400",
    )
    parser.add_argument(
        "--max-log-len",
        type=int,
        default=None,
        help="with --enable-log-requests, log at most this many characters of each prompt",
    )
    parser.add_argument(
        "--disable-log-requests",
        action="store_true",
        help="do not log requests (the default now, as in vLLM; kept for older command lines)",
    )
    parser.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="do not log the throughput and cache line (every 10 s, or every "
        "$LMSERVE_LOG_STATS_INTERVAL / $VLLM_LOG_STATS_INTERVAL seconds)",
    )
    parser.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="do not log each HTTP request line (uvicorn's access log)",
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
    from lmserve.benchmarks import (
        accuracy,
        embed,
        overload,
        soak,
        structured,
        throughput,
        transcribe,
    )
    from lmserve.benchmarks import serve as serve_bench

    parser = argparse.ArgumentParser(
        prog="lmserve", description="LLM inference: offline engine, chat and benchmarks."
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    serve.add_argument(
        "--config", default=None, help="YAML file of flags (name: value); command-line flags win"
    )
    add_engine_cli_args(serve)
    _add_server_args(serve)
    serve.set_defaults(func=_serve)
    run = commands.add_parser(
        "run", help="deploy a Ray Serve config file (as `serve run`), starting Ray if needed"
    )
    run.add_argument("config", help="Serve config YAML: applications with import_path and args")
    run.set_defaults(func=_run)
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
    online = bench.add_parser(
        "serve", help="latency and throughput of a running OpenAI-compatible server, streamed"
    )
    serve_bench.add_arguments(online)
    online.set_defaults(func=lambda args: (serve_bench.main(args), 0)[1])
    constrained = bench.add_parser(
        "structured", help="JSON-schema-constrained decoding vs the same requests unconstrained"
    )
    structured.add_arguments(constrained)
    constrained.set_defaults(func=lambda args: (structured.main(args), 0)[1])
    fidelity = bench.add_parser(
        "accuracy", help="a quantized engine against the unquantized one on the same weights"
    )
    accuracy.add_arguments(fidelity)
    fidelity.set_defaults(func=lambda args: (accuracy.main(args), 0)[1])
    burst = bench.add_parser(
        "overload", help="many requests at once against a bounded queue: 200s or 503s, no hang"
    )
    overload.add_arguments(burst)
    burst.set_defaults(func=lambda args: (overload.main(args), 0)[1])
    embedding = bench.add_parser(
        "embed", help="embedding sentences/s and one-sentence latency, beside sentence-transformers"
    )
    embed.add_arguments(embedding)
    embedding.set_defaults(func=lambda args: (embed.main(args), 0)[1])
    speech = bench.add_parser(
        "transcribe", help="speech-to-text audio seconds per second, beside HF and faster-whisper"
    )
    transcribe.add_arguments(speech)
    speech.set_defaults(func=lambda args: (transcribe.main(args), 0)[1])
    long_run = bench.add_parser(
        "soak", help="mixed traffic for a long while; the server's memory growth and errors"
    )
    soak.add_arguments(long_run)
    long_run.set_defaults(func=lambda args: (soak.main(args), 0)[1])
    return parser


def _expand_config_file(argv: list[str]) -> list[str]:
    """`--config FILE.yaml` becomes the flags it holds, placed before the command line's own
    flags so that those win: {max-model-len: 2048, enable-prefix-caching: false, ...}."""
    if "--config" not in argv:
        return argv
    import yaml

    at = argv.index("--config")
    if at + 1 >= len(argv):
        raise SystemExit("lmserve: error: --config needs a YAML file")
    path = argv[at + 1]
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"lmserve: error: {path} must hold a mapping of flag names to values")
    flags: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        elif key == "model":
            flags.append(str(value))
        else:
            flags += [flag, str(value)]
    rest = argv[:at] + argv[at + 2 :]
    command_end = next((i + 1 for i, a in enumerate(rest) if a in ("serve", "chat")), len(rest))
    return rest[:command_end] + flags + rest[command_end:]


def main(argv: list[str] | None = None) -> int:
    argv = _expand_config_file(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"lmserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
