"""The everyday client code of the seed documents (chat, completion, streaming, a batch loop),
written the way those users write it, against `lmserve serve --api-key`."""

from __future__ import annotations

import pytest
from openai import OpenAI

from tests.api.conftest import start_server, stop_server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def client(smollm2_dir):
    server = start_server(
        "--api-key", "my-secret-key", "--max-model-len", "2048", "--kv-cache-memory-gb", "0.25"
    )
    yield OpenAI(base_url=f"{server.url}/v1", api_key="my-secret-key")
    stop_server(server)


def test_system_and_user_chat(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful AI assistant."},
            {"role": "user", "content": "Explain gravity in one sentence."},
        ],
        temperature=0.7,
        max_tokens=100,
    )
    assert response.choices[0].message.content.strip()


def test_raw_completion(client: OpenAI) -> None:
    response = client.completions.create(
        model=MODEL, prompt="def fibonacci(n):", max_tokens=64, temperature=0.1
    )
    assert response.choices[0].text and response.usage.completion_tokens <= 64


def test_streaming_loop(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a short poem about rust."}],
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_batch_loop(client: OpenAI) -> None:
    answers = {}
    for prompt in ["What is the capital of France?", "What is 2+2?", "Who wrote Hamlet?"]:
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0.0
        )
        answers[prompt] = response.choices[0].message.content
    assert "Paris" in answers["What is the capital of France?"]
    assert all(answers.values())
