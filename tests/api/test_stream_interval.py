"""--stream-interval and a request's stream_interval through the official openai client: the
first snapshot streams at once, then a chunk each N tokens or more, the rest with the finish;
the text is the same as unstreamed; a request may ask for a longer interval, not a shorter one.
(SmolLM2, whose steps are slow enough that each one is its own snapshot: a tiny model's steps
may reach the server several at a time, chunks of many tokens whatever the interval.)"""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server

SERVER_INTERVAL = 4
TOKENS = 17


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server(
        "--max-model-len",
        "512",
        "--kv-cache-memory-gb",
        "0.05",
        "--stream-interval",
        str(SERVER_INTERVAL),
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")


def _completion_chunks(client: openai.OpenAI, **extra) -> tuple[list[int], str]:
    """(tokens in each streamed chunk that carries any, the streamed text)."""
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=[1, 2, 3, 4],
        max_tokens=TOKENS,
        temperature=0.0,
        logprobs=1,
        stream=True,
        extra_body={"ignore_eos": True, **extra},
    )
    sizes, text = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            tokens = choice.logprobs.tokens if choice.logprobs else []
            if tokens:
                sizes.append(len(tokens))
            text += choice.text
    return sizes, text


def _unstreamed(client: openai.OpenAI) -> str:
    reply = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=[1, 2, 3, 4],
        max_tokens=TOKENS,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    return reply.choices[0].text


def _assert_chunked_by(sizes: list[int], interval: int) -> None:
    """Every token streamed; between the first chunk and the last, none smaller than the
    interval, so at most 1 + (TOKENS - 1) / interval chunks."""
    assert sum(sizes) == TOKENS
    assert all(size >= interval for size in sizes[1:-1]), sizes
    assert len(sizes) <= 1 + math.ceil((TOKENS - 1) / interval), sizes


def test_the_server_interval_groups_tokens(client: openai.OpenAI) -> None:
    sizes, text = _completion_chunks(client)
    _assert_chunked_by(sizes, SERVER_INTERVAL)
    assert text == _unstreamed(client)


@pytest.mark.parametrize(("asked", "interval"), [(8, 8), (2, SERVER_INTERVAL)])
def test_a_request_may_ask_for_longer_chunks_not_shorter(
    client: openai.OpenAI, asked: int, interval: int
) -> None:
    sizes, text = _completion_chunks(client, stream_interval=asked)
    _assert_chunked_by(sizes, interval)
    assert text == _unstreamed(client)


def test_chat_streams_by_the_interval_too(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=TOKENS,
        temperature=0.0,
        logprobs=True,
        stream=True,
        extra_body={"ignore_eos": True, "stream_interval": 6},
    )
    sizes = [
        len(choice.logprobs.content)
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
    ]
    _assert_chunked_by(sizes, 6)


def test_a_zero_interval_is_a_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        _completion_chunks(client, stream_interval=0)
    assert "stream_interval" in str(error.value)
