"""A real `lmserve serve` subprocess on a free loopback port, shared by a test module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass(frozen=True)
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path  # the server's stdout and stderr

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_server(
    *args: str,
    scheme: str = "http",
    uvicorn_log_level: str = "warning",
    env: dict[str, str] | None = None,
) -> Server:
    """The server process, started and not waited for (see `wait_until_healthy`), so a test can
    do other work while it loads.

    NOTE: the log goes to a file, not a pipe: nobody reads a pipe while tests run, and once
    its 64 KiB buffer fills the server blocks writing its request log and stops answering."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="lmserve-server-", suffix=".log")[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmserve.cli",
            "serve",
            *args,
            "--port",
            str(port),
            "--uvicorn-log-level",
            uvicorn_log_level,
        ],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=None if env is None else {**os.environ, **env},
    )
    return Server(f"{scheme}://127.0.0.1:{port}", proc, log_path)


def wait_until_healthy(server: Server, timeout_s: float = 240) -> Server:
    """Until /health answers 200 (an https server's certificate is not checked); the log in
    the error if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1, verify=False).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.proc.kill()
    raise RuntimeError("server did not become healthy in time")


def start_server(
    *args: str,
    timeout_s: float = 240,
    scheme: str = "http",
    uvicorn_log_level: str = "warning",
    env: dict[str, str] | None = None,
) -> Server:
    """A server that answers /health."""
    server = launch_server(*args, scheme=scheme, uvicorn_log_level=uvicorn_log_level, env=env)
    return wait_until_healthy(server, timeout_s)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="module")
def smollm2_server(smollm2_dir) -> Iterator[Server]:
    server = start_server("--max-model-len", "2048", "--kv-cache-memory-gb", "0.25")
    yield server
    stop_server(server)
