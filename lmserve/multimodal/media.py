"""Images named by a request, fetched and decoded under limits: `data:` URLs, `http(s)` URLs and
`file://` paths, as vLLM's media connector takes them.

A URL from a client is untrusted: fetching it must not let the client reach what only the
server can (loopback, the private network, cloud metadata at 169.254.169.254). So an http(s)
fetch goes only to public addresses, unless --allowed-media-domains names its host (and then to
those hosts only): the name is resolved here, every address it resolves to must be public, and
the connection goes to the address checked (with the name as Host and TLS server name), so a
DNS answer that changes between the check and the connect (rebinding) cannot slip through and
nothing is ever sent to a refused address. Every redirect hop is checked again, and there are
at most `max_redirects` of them. The whole fetch has a deadline and
a byte limit. `file://` reads only under --allowed-local-media-path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from lmserve.config import ModelConfig

_REDIRECTS = {301, 302, 303, 307, 308}


class MediaError(ValueError):
    """A media reference the server will not (or cannot) turn into an image; the message says
    which rule and is safe to show the client."""


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str] | None = None  # set: only these hosts, private or not
    allowed_local_path: Path | None = None  # file:// URLs must resolve under it
    timeout_s: float = 5.0  # a whole fetch, redirects included (vLLM's image fetch timeout)
    max_bytes: int = 20 * 2**20  # one image's encoded bytes
    max_redirects: int = 5
    max_pixels: int = 50_000_000  # decoded size, against decompression bombs

    @classmethod
    def of(cls, model: ModelConfig) -> MediaPolicy:
        """The policy the engine's --allowed-media-domains / --allowed-local-media-path set."""
        domains = model.allowed_media_domains
        return cls(
            allowed_domains=frozenset(domains) if domains is not None else None,
            allowed_local_path=model.allowed_local_media_path,
        )


async def load_images(sources: list[Any], policy: MediaPolicy) -> list[Any]:
    """Each of a prompt's images as an RGB PIL image: URLs fetched concurrently and decoded
    off the event loop, PIL images (offline callers) as they are. A MediaError names the image
    at fault by its place in the prompt."""
    from PIL import Image

    async def one(i: int, source: Any) -> Any:
        try:
            if isinstance(source, Image.Image):
                return source.convert("RGB")
            if not isinstance(source, str):
                raise MediaError(f"an image is a URL or a PIL image, not {type(source).__name__}")
            data = await fetch_media(source, policy)
            return await asyncio.to_thread(decode_image, data, policy)
        except MediaError as exc:
            raise MediaError(f"image {i + 1} of the prompt: {exc}") from None

    return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(sources))))


async def fetch_media(url: str, policy: MediaPolicy) -> bytes:
    """The bytes `url` names; MediaError when a rule refuses it or it cannot be had."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "data":
        return _data_url(url, policy)
    if scheme == "file":
        return await asyncio.to_thread(_local_file, url, policy)
    if scheme in ("http", "https"):
        try:
            return await asyncio.wait_for(_fetch(url, policy), policy.timeout_s)
        except TimeoutError:
            raise MediaError(f"fetching {url} took longer than {policy.timeout_s:g} s") from None
    raise MediaError(f"media URLs must be http(s), data: or file:, not {scheme or 'schemeless'}")


def decode_image(data: bytes, policy: MediaPolicy) -> object:
    """The image in `data` as RGB (a PIL image); MediaError when it is not a whole image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > policy.max_pixels:
                raise MediaError(
                    f"the image is {width}x{height} pixels, more than the {policy.max_pixels} allowed"
                )
            probe.load()
            return probe.convert("RGB")
    except UnidentifiedImageError:
        raise MediaError("the data is not an image (PNG, JPEG, WebP, GIF, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"the image is broken or cut short: {exc}") from None


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError("a data: URL must be data:<media type>;base64,<data>")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaError(f"the data: URL holds more than {policy.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL's payload is not valid base64") from None


def _local_file(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_path is None:
        raise MediaError("file: URLs are off: start the server with --allowed-local-media-path")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("a file: URL names a path on this server, not a host")
    root = policy.allowed_local_path.resolve()
    path = Path(unquote(parts.path)).resolve()
    if not path.is_relative_to(root):
        raise MediaError(f"file: URLs must name a file under {root}")
    if not path.is_file():
        raise MediaError("the file: URL names no file")
    if path.stat().st_size > policy.max_bytes:
        raise MediaError(f"the file is larger than {policy.max_bytes} bytes")
    return path.read_bytes()


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
        for _ in range(policy.max_redirects + 1):
            target, headers, extensions = await _pinned(url, policy)
            try:
                async with client.stream(
                    "GET", target, headers=headers, extensions=extensions
                ) as response:
                    if response.status_code in _REDIRECTS and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        if urlsplit(url).scheme not in ("http", "https"):
                            raise MediaError("a media URL redirected away from http(s)")
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"fetching the media URL answered {response.status_code}")
                    return await _read_bounded(response, policy.max_bytes)
            except httpx.HTTPError as exc:
                raise MediaError(f"the media URL could not be fetched: {exc}") from None
    raise MediaError(f"the media URL redirected more than {policy.max_redirects} times")


async def _pinned(url: str, policy: MediaPolicy) -> tuple[str, dict[str, str], dict[str, str]]:
    """The URL to connect to, with its headers and extensions: for a host not allowed by name,
    the URL rewritten to the public address it was checked to resolve to."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if policy.allowed_domains is not None:
        if host.lower() not in policy.allowed_domains:
            raise MediaError(f"media from {host} is not allowed (--allowed-media-domains)")
        return url, {}, {}
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise MediaError(f"the media URL's host {host} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in found]
    if not addresses or not all(address.is_global for address in addresses):
        raise MediaError(_private(host))
    address = addresses[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    target = parts._replace(netloc=f"{netloc}:{port}").geturl()
    return target, {"Host": parts.netloc.rpartition("@")[2]}, {"sni_hostname": host}


def _private(host: str) -> str:
    return (
        f"media from {host} is refused: it is a private, loopback or link-local address; "
        "name it in --allowed-media-domains to allow it"
    )


async def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise MediaError(f"the media is {declared} bytes, more than the {max_bytes} allowed")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise MediaError(f"the media is more than the {max_bytes} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)
