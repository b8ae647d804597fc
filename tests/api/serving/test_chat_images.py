"""Images in chat on `lmserve serve` with a tiny LLaVA, through the official openai client:
`image_url` parts as data: URLs, http(s) URLs (loopback only because --allowed-media-domains
names it) and file:// paths under --allowed-local-media-path give HF's tokens; streaming
works; every bad image or rule broken is a 400 that names the image and the reason."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.api.conftest import Server, start_server, stop_server
from tests.models.test_llava import PROMPT, _hf_tokens, _png, hf, images  # noqa: F401 - fixtures

QUESTION = "What is in the picture?"
LIMITS = dict(
    max_tokens=12, temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True}
)


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory, images) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("media")
    for i, image in enumerate(images):
        (root / f"{i}.png").write_bytes(_png_bytes(image))
    images[1].save(root / "photo.jpg", format="JPEG")
    (root / "cut.png").write_bytes(_png_bytes(images[0])[:300])
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def image_host(media_dir: Path) -> Iterator[str]:
    """A plain HTTP server on loopback serving the media directory."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_llava_dir: Path, media_dir: Path) -> Iterator[Server]:
    server = start_server(
        str(tiny_llava_dir), "--served-model-name", "llava",
        "--allowed-media-domains", "127.0.0.1",
        "--allowed-local-media-path", str(media_dir),
        "--limit-mm-per-prompt", "image=2",  # vLLM's form, as seed 003 writes it
        "--trust-remote-code",
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _ask(client: openai.OpenAI, *urls: str, text: str = QUESTION, **kwargs):
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    messages = [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
    return client.chat.completions.create(model="llava", messages=messages, **{**LIMITS, **kwargs})


def _data_url(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(_png_bytes(image)).decode()


def test_every_kind_of_image_url_gives_hfs_tokens(
    client: openai.OpenAI,
    hf,  # noqa: F811
    images,  # noqa: F811
    image_host: str,
    media_dir: Path,  # noqa: F811
) -> None:
    expected = _hf_tokens(hf, PROMPT, [images[0]])
    for url in (_data_url(images[0]), f"{image_host}/0.png", (media_dir / "0.png").as_uri()):
        answer = _ask(client, url)
        assert answer.choices[0].token_ids == expected, url[:40]
        assert answer.usage.prompt_tokens == len(answer.prompt_token_ids) > 16  # 16 image rows
    other = _ask(client, _data_url(images[1]))
    assert other.choices[0].token_ids == _hf_tokens(hf, PROMPT, [images[1]])


def test_two_images_and_a_stream(client: openai.OpenAI, hf, images) -> None:  # noqa: F811
    two = _ask(client, _data_url(images[0]), _data_url(images[2]))
    prompt = f"USER: <image>\n<image>\n{QUESTION}\nASSISTANT:"
    expected = _hf_tokens(hf, prompt, [images[0], images[2]])
    assert two.choices[0].token_ids == expected
    chunks = list(_ask(client, _data_url(images[0]), _data_url(images[2]), stream=True))
    streamed = [
        t for c in chunks if c.choices for t in (getattr(c.choices[0], "token_ids", None) or [])
    ]
    assert streamed == expected


def _error(server: Server, content: list) -> httpx.Response:
    body = {"model": "llava", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def test_bad_images_are_400s_that_say_which_and_why(
    server: Server,
    images,  # noqa: F811
    image_host: str,
    media_dir: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    def part(url: str) -> dict:
        return {"type": "image_url", "image_url": {"url": url}}

    text = {"type": "text", "text": QUESTION}
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png_bytes(images[0]))
    port = image_host.rsplit(":", 1)[1]
    cases = {
        "image 1 of the prompt: the image is broken": [
            part((media_dir / "cut.png").as_uri()),
            text,
        ],
        "image 2 of the prompt: the data is not an image": [
            part(_data_url(images[0])),
            part(f"{image_host}/notes.txt"),
            text,
        ],
        "3 images in one prompt, more than the 2 allowed": [part(_data_url(images[0]))] * 3
        + [text],
        "localhost": [part(f"http://localhost:{port}/0.png"), text],
        "file: URLs must name a file under": [part(outside.as_uri()), text],
        "404": [part(f"{image_host}/missing.png"), text],
    }
    for reason, content in cases.items():
        response = _error(server, content)
        assert response.status_code == 400, (reason, response.text)
        error = response.json()["error"]
        assert reason in error["message"] and error["param"] == "messages", (reason, error)
    # the engine is unharmed
    good = _error(server, [part(_data_url(images[0])), text])
    assert good.status_code == 200


def test_anthropic_image_blocks_and_responses_input_images(
    server: Server,
    client: openai.OpenAI,
    images,  # noqa: F811
    image_host: str,
) -> None:
    """Both map onto the chat path: the same prompt, so the same answer as chat's."""
    import anthropic

    chat_text = (
        client.chat.completions.create(
            model="llava",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_url(images[0])}},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    assert chat_text
    data = base64.b64encode(_png_bytes(images[0])).decode()
    claude = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    for source in (
        {"type": "base64", "media_type": "image/png", "data": data},
        {"type": "url", "url": f"{image_host}/0.png"},
    ):
        message = claude.messages.create(
            model="llava",
            max_tokens=12,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": source},
                        {"type": "text", "text": QUESTION},
                    ],
                }
            ],
            extra_body={"temperature": 0},
        )
        assert message.content[0].text == chat_text
    response = client.responses.create(
        model="llava",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": _data_url(images[0])},
                    {"type": "input_text", "text": QUESTION},
                ],
            }
        ],
        max_output_tokens=12,
        temperature=0,
    )
    assert response.output_text == chat_text


def test_seed_003_vision_snippets_run(server: Server, image_host: str, media_dir: Path) -> None:
    """Seed 003's Option A (an image URL) and Option B (a local JPEG as base64), with the base
    URL, model name and image URL changed: each answers, text part first as the seed sends."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY")
    model_name = "llava"
    response = client.chat.completions.create(
        model=model_name,
        messages=[{
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image? Describe it in detail."},
                {"type": "image_url", "image_url": {"url": f"{image_host}/photo.jpg"}},
            ],
        }],
        max_tokens=300,
    )  # fmt: skip
    assert response.choices[0].message.content
    assert response.usage.prompt_tokens > 16  # the image's 16 rows are in the prompt

    def encode_image(image_path):
        with open(image_path, "rb") as image_file:
            return base64.b64encode(image_file.read()).decode("utf-8")

    base64_image = encode_image(media_dir / "photo.jpg")
    by_base64 = client.chat.completions.create(
        model="llava",
        messages=[{
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image? Describe it in detail."},
                {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{base64_image}"}},
            ],
        }],
        max_tokens=300,
        temperature=0,
    )  # fmt: skip
    by_url = client.chat.completions.create(
        model="llava",
        messages=[{
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image? Describe it in detail."},
                {"type": "image_url", "image_url": {"url": f"{image_host}/photo.jpg"}},
            ],
        }],
        max_tokens=300,
        temperature=0,
    )  # fmt: skip
    assert by_base64.choices[0].message.content == by_url.choices[0].message.content


def test_fifty_image_requests_with_disconnects_leave_nothing_held(server: Server) -> None:
    """50 streamed requests over 3 new images, every other one closed after its first chunk:
    afterwards no request runs and no KV block is held, the prefix cache served the repeats,
    and the encoder ran once per image (mm_cache_queries - mm_cache_hits)."""
    import asyncio

    from tests.api.test_server import metric, metrics_once_idle

    fresh = [_data_url(_png(10 + i, (30 + i, 30))) for i in range(3)]

    def counts() -> tuple[float, float]:
        text = metrics_once_idle(server)
        return metric(text, "lmserve:mm_cache_queries_total"), metric(
            text, "lmserve:mm_cache_hits_total"
        )

    async def one(http: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": "llava",
            "stream": True,
            "max_tokens": 40,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": fresh[i % 3]}},
                {"type": "text", "text": f"Picture {i}?"}]}],
        }  # fmt: skip
        async with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and i % 2:
                    return  # this client leaves

    async def all_of_them() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            await asyncio.gather(*(one(http, i) for i in range(50)))

    queries, hits = counts()
    prefix_hits = metric(metrics_once_idle(server), "lmserve:prefix_cache_hits_total")
    asyncio.run(all_of_them())
    text = metrics_once_idle(server)
    assert metric(text, "lmserve:num_requests_running") == 0
    assert metric(text, "lmserve:kv_cache_usage_perc") == 0
    # requests after the first with each image reuse its KV blocks (the image's rows included)
    assert metric(text, "lmserve:prefix_cache_hits_total") - prefix_hits >= 47 * 16
    new_queries, new_hits = counts()
    assert new_queries - queries >= 50
    assert (new_queries - queries) - (new_hits - hits) == 3  # one encode per distinct image
