"""Server flags end to end: --config files, aliases, request ids, CORS, chat templates, and the
engine process's lifetime."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Server, start_server, stop_server

TEMPLATE = "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:"


@pytest.fixture(scope="module")
def configured(smollm2_dir, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cfg")
    (root / "template.jinja").write_text(TEMPLATE)
    config = root / "serve.yaml"
    config.write_text(
        "served-model-name: [smol, alias]\n"
        "enable-request-id-headers: true\n"
        "allowed-origins: ['http://example.com']\n"
        f"chat-template: {root / 'template.jinja'}\n"
        "max-model-len: 1024\n"
        "kv-cache-memory-gb: 0.25\n"
        "enable-prefix-caching: false\n"
        "disable-fastapi-docs: true\n"
        "enable-log-requests: true\n"
        "max-log-len: 4\n"
    )
    server = start_server("--config", str(config), "--max-model-len", "512")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def detailed(smollm2_dir):
    server = start_server(
        "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25",
        "--enable-prompt-tokens-details", "--enable-force-include-usage",
        "--disable-log-stats", "--disable-uvicorn-access-log", "--return-tokens-as-token-ids",
        uvicorn_log_level="info", env={"LMSERVE_LOG_STATS_INTERVAL": "1"},
    )  # fmt: skip
    yield server
    stop_server(server)


def test_prompt_tokens_details_and_forced_usage(detailed: Server) -> None:
    """cached_tokens counts the prompt's prefix-cache hits (none the first time, whole blocks
    the second); every stream chunk carries usage, asked for or not; Anthropic's usage says it as
    cache_read_input_tokens."""
    chat = {"messages": [{"role": "user", "content": "Name three rivers of Europe. " * 4}],
            "max_tokens": 4, "temperature": 0}  # fmt: skip
    url = f"{detailed.url}/v1/chat/completions"
    first = httpx.post(url, json=chat, timeout=60).json()["usage"]
    second = httpx.post(url, json=chat, timeout=60).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 16 == 0 and cached < second["prompt_tokens"]
    body = {"prompt": "Name three rivers of Europe. " * 4, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{detailed.url}/v1/completions", json=body, timeout=60) as r:
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: {")]
    usage = json.loads(data[-1])["usage"]
    assert usage["completion_tokens"] == 3 and "cached_tokens" in usage["prompt_tokens_details"]
    # as vLLM's --enable-force-include-usage: usage on every chunk too, not only a last one
    assert all(json.loads(chunk)["usage"]["prompt_tokens"] > 0 for chunk in data)
    messages = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "max_tokens": 4, **chat}
    reply = httpx.post(f"{detailed.url}/v1/messages", json=messages, timeout=60).json()
    assert reply["usage"]["cache_read_input_tokens"] == cached


def test_tokens_as_token_ids(detailed: Server) -> None:
    """--return-tokens-as-token-ids: every logprob token is "token_id:{id}", the sampled ones
    the ids generated."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logprobs": True,
            "top_logprobs": 2, "return_token_ids": True}  # fmt: skip
    reply = httpx.post(f"{detailed.url}/v1/chat/completions", json=chat, timeout=60).json()
    choice = reply["choices"][0]
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(top["token"].startswith("token_id:") for c in content for top in c["top_logprobs"])
    body = {"prompt": "Hi", "max_tokens": 3, "logprobs": 2, "return_token_ids": True}
    reply = httpx.post(f"{detailed.url}/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(k.startswith("token_id:") for top in choice["logprobs"]["top_logprobs"] for k in top)


def test_quiet_logs(detailed: Server) -> None:
    """--disable-log-stats and --disable-uvicorn-access-log, with uvicorn logging at info."""
    body = {"prompt": "Count:", "max_tokens": 100, "ignore_eos": True}
    assert httpx.post(f"{detailed.url}/v1/completions", json=body, timeout=120).status_code == 200
    time.sleep(1.5)  # a stats line would be written every second after tokens were generated
    log = detailed.log()
    assert "Uvicorn running on" in log  # info lines still come
    assert "generation: " not in log and "POST /v1/completions" not in log
    assert "request cmpl-" not in log  # requests are logged only with --enable-log-requests


def _self_signed_certificate(root: Path) -> tuple[Path, Path]:
    """A key and a self-signed CA certificate for 127.0.0.1, made with `cryptography`."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = root / "key.pem", root / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_https_with_ssl_flags(tiny_model_dirs, tmp_path: Path) -> None:
    """--ssl-keyfile/--ssl-certfile serve HTTPS: a client trusting the certificate is answered,
    and plain HTTP on that port is not."""
    key, cert = _self_signed_certificate(tmp_path)
    server = start_server(
        str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.01",
        "--ssl-keyfile", str(key), "--ssl-certfile", str(cert), scheme="https",
    )  # fmt: skip
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}
        reply = httpx.post(f"{server.url}/v1/completions", json=body, verify=str(cert))
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        stop_server(server)


def test_sleep_mode_routes(tiny_model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1: an asleep engine answers requests
    with 503, and /wake_up brings back the same answers."""
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    server = start_server(
        str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.05", "--enable-sleep-mode"
    )
    url = server.url
    body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip

    def tokens() -> list[int]:
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["token_ids"]

    try:
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
        expected = tokens()
        assert httpx.post(f"{url}/sleep", params={"level": 2}, timeout=60).status_code == 200
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
        asleep = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert asleep.status_code == 503 and "asleep" in asleep.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200
        partial = httpx.post(f"{url}/wake_up", params={"tags": "weights"}, timeout=60)
        assert partial.status_code == 400
        assert httpx.post(f"{url}/wake_up", timeout=120).status_code == 200
        assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
        assert tokens() == expected
        assert httpx.post(f"{url}/sleep", params={"level": 3}).status_code == 400
    finally:
        stop_server(server)


def test_config_file_and_flag_precedence(configured: Server) -> None:
    models = httpx.get(f"{configured.url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["smol", "alias"]
    assert models[0]["max_model_len"] == 512  # the command line beats the file
    reply = httpx.post(
        f"{configured.url}/v1/completions",
        json={"model": "alias", "prompt": "Hi", "max_tokens": 2},
        headers={"X-Request-Id": "abc123"},
    )
    assert reply.status_code == 200 and reply.json()["model"] == "smol"
    assert reply.headers["x-request-id"] == "abc123"
    assert httpx.get(f"{configured.url}/version").headers["x-request-id"]
    assert httpx.get(f"{configured.url}/docs").status_code == 404
    assert httpx.post(f"{configured.url}/sleep").status_code == 404  # dev mode only
    log = configured.log()  # --enable-log-requests, prompts cut to --max-log-len characters
    assert "request cmpl-" in log and "prompt: 'Hi'" in log
    httpx.post(f"{configured.url}/v1/completions", json={"prompt": "Hello world", "max_tokens": 1})
    assert "prompt: 'Hell'," in configured.log()


def test_cors_preflight(configured: Server) -> None:
    preflight = httpx.options(
        f"{configured.url}/v1/chat/completions",
        headers={"Origin": "http://example.com", "Access-Control-Request-Method": "POST"},
    )
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    other = httpx.options(
        f"{configured.url}/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in other.headers


def test_chat_template_flag_is_used(configured: Server) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    tokens = httpx.post(f"{configured.url}/tokenize", json={"messages": messages}).json()
    text = httpx.post(f"{configured.url}/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Q: hello\nA:"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_engine_process_never_outlives_the_server(tiny_model_dirs, sig: int) -> None:
    server = start_server(str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.01")
    try:
        children = _children(server.proc.pid)
        assert children, "the engine core runs in a child process"
        no_template = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}]},
        )
        assert no_template.status_code == 400
        assert "--chat-template" in no_template.json()["error"]["message"]
        os.kill(server.proc.pid, sig)
        server.proc.wait(timeout=30)
        if sig == signal.SIGTERM:
            assert server.proc.returncode == 0
        assert all(_gone(child, 15) for child in children)
    finally:
        if server.proc.poll() is None:
            stop_server(server)


def test_dead_engine_is_503_not_a_hang(tiny_model_dirs) -> None:
    server = start_server(str(tiny_model_dirs["llama"]), "--kv-cache-memory-gb", "0.01")
    try:
        (core,) = [
            pid
            for pid in _children(server.proc.pid)
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        os.kill(core, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.url}/health").status_code == 200:
            assert time.monotonic() < deadline, "/health never noticed the dead engine"
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
        reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        assert reply.status_code == 503 and "not running" in reply.json()["error"]["message"]
    finally:
        stop_server(server)


def test_response_role_root_path_and_stats_log(smollm2_dir) -> None:
    server = start_server(
        "--response-role",
        "bot",
        "--root-path",
        "/llm",
        "--max-model-len",
        "512",
        "--kv-cache-memory-gb",
        "0.1",
        env={"VLLM_LOG_STATS_INTERVAL": "1"},  # vLLM's name for the interval, read as its own
    )
    try:
        messages = [
            {"role": "system", "content": "You call tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
        reply = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": messages, "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "bot"
        # behind a proxy that strips /llm, the API description points clients back through it
        assert httpx.get(f"{server.url}/openapi.json").json()["servers"] == [{"url": "/llm"}]
        busy = httpx.post(
            f"{server.url}/v1/completions",
            json={"prompt": "Count:", "max_tokens": 100, "ignore_eos": True},
            timeout=120,
        )
        assert busy.status_code == 200
        time.sleep(1.5)  # the stats line is written every second after tokens were generated
    finally:
        stop_server(server)
    log = server.log()
    assert "running: " in log and "generation: " in log and "tok/s" in log
