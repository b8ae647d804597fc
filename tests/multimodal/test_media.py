"""Media URLs fetched and decoded under limits: data, file and http(s) forms, against a real
HTTP server on loopback, which is refused unless allowed by name (and then never reached)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from lmserve.multimodal.media import MediaError, MediaPolicy, _pinned, decode_image, fetch_media


def _png(width: int = 8, height: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 40)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()
ALLOWED = MediaPolicy(allowed_domains=frozenset({"localhost"}), timeout_s=2, max_bytes=2**20)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, list[str]]]:
    """http://localhost:PORT serving an image, a large body, a slow one and redirects; the
    list records every path asked for."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.path)
            port = self.server.server_address[1]
            routes = {
                "/img.png": (200, {"Content-Type": "image/png"}, PNG),
                "/big": (200, {}, b"\0" * (2 * 2**20)),
                "/redirect": (302, {"Location": "/img.png"}, b""),
                "/loop": (302, {"Location": "/loop"}, b""),
                "/to-ip": (302, {"Location": f"http://127.0.0.1:{port}/img.png"}, b""),
                "/missing": (404, {}, b""),
            }
            if self.path == "/slow":
                time.sleep(3)
            status, headers, body = routes.get(self.path, (200, {}, b"late"))
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{httpd.server_address[1]}", seen
    httpd.shutdown()


def fetch(url: str, policy: MediaPolicy = ALLOWED) -> bytes:
    return asyncio.run(fetch_media(url, policy))


def test_data_urls() -> None:
    url = "data:image/png;base64," + base64.b64encode(PNG).decode()
    image = decode_image(fetch(url), ALLOWED)
    assert image.size == (8, 6) and image.mode == "RGB"
    for bad, why in [("data:image/png,abc", "base64"), ("data:image/png;base64,@@@", "not valid")]:
        with pytest.raises(MediaError, match=why):
            fetch(bad)


def test_what_is_not_an_image() -> None:
    with pytest.raises(MediaError, match="not an image"):
        decode_image(b"hello, world", ALLOWED)
    with pytest.raises(MediaError, match="broken or cut short"):
        decode_image(_png(64, 64)[:-40], ALLOWED)
    with pytest.raises(MediaError, match="more than the 100 allowed"):
        decode_image(_png(20, 20), MediaPolicy(max_pixels=100))


def test_loopback_is_refused_unless_allowed_and_never_reached(server) -> None:
    base, seen = server
    port = base.rsplit(":", 1)[1]
    for url in (f"{base}/img.png", f"http://127.0.0.1:{port}/img.png", f"http://[::1]:{port}/x",
                "http://10.0.0.1/x", "http://169.254.169.254/latest/meta-data"):  # fmt: skip
        with pytest.raises(MediaError, match="private, loopback or link-local"):
            fetch(url, MediaPolicy(timeout_s=2))
    assert seen == []  # refused before any connection
    assert decode_image(fetch(f"{base}/img.png"), ALLOWED).size == (8, 6)
    with pytest.raises(MediaError, match="not allowed"):  # an allow-list admits only its hosts
        fetch(f"http://127.0.0.1:{port}/img.png")


def test_redirects_are_checked_and_bounded(server) -> None:
    base, seen = server
    assert fetch(f"{base}/redirect") == PNG
    seen.clear()
    with pytest.raises(MediaError, match="not allowed"):
        fetch(f"{base}/to-ip")  # localhost is allowed, the address it redirects to is not
    assert seen == ["/to-ip"]
    with pytest.raises(MediaError, match="redirected more than 5 times"):
        fetch(f"{base}/loop")


def test_size_time_and_status_limits(server) -> None:
    base, _ = server
    with pytest.raises(MediaError, match="more than the 1048576 allowed"):
        fetch(f"{base}/big")
    start = time.monotonic()
    with pytest.raises(MediaError, match="longer than 2 s"):
        fetch(f"{base}/slow")
    assert time.monotonic() - start < 2.5
    with pytest.raises(MediaError, match="answered 404"):
        fetch(f"{base}/missing")
    with pytest.raises(MediaError, match="must be http"):
        fetch("ftp://example.com/x.png")


def test_a_public_address_is_connected_to_as_checked() -> None:
    """The connection goes to the address that was checked, the name kept for Host and TLS."""
    policy = MediaPolicy()
    target, headers, extensions = asyncio.run(_pinned("https://93.184.216.34/a.png?x=1", policy))
    assert target == "https://93.184.216.34:443/a.png?x=1"
    assert headers == {"Host": "93.184.216.34"} and extensions == {"sni_hostname": "93.184.216.34"}


def test_local_files_only_under_the_allowed_path(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        fetch(f"file://{tmp_path}/ok/a.png", MediaPolicy())
    policy = MediaPolicy(allowed_local_path=tmp_path / "ok")
    assert fetch(f"file://{tmp_path}/ok/a.png", policy) == PNG
    for url in (f"file://{tmp_path}/secret.png", f"file://{tmp_path}/ok/../secret.png",
                f"file://{tmp_path}/ok/missing.png"):  # fmt: skip
        with pytest.raises(MediaError, match="must name a file under|names no file"):
            fetch(url, policy)
