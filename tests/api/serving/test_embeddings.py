"""POST /v1/embeddings on `lmserve serve --task embed` (seed 003's flag; no model: the bundled
all-MiniLM-L6-v2), through the official openai client: equal to sentence-transformers, float
and base64, seed 003's client as written, and every misuse a 400 in OpenAI's error shape."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_openai_schema import validate  # noqa: F401 - the fixture
from tests.models.test_bert import sentences

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def server(minilm_dir) -> Iterator[Server]:
    server = start_server("--task", "embed")  # no model: the bundled embedder
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def reference(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def test_embeddings_equal_sentence_transformers(client: openai.OpenAI, reference) -> None:
    texts = sentences(200)
    answer = client.embeddings.create(model=MODEL, input=texts,
                                      extra_body={"truncate_prompt_tokens": -1})  # fmt: skip
    ours = np.array([d.embedding for d in answer.data])
    expected = reference.encode(texts, batch_size=64, normalize_embeddings=True)
    assert [d.index for d in answer.data] == list(range(200))
    assert np.abs(ours - expected).max() < 1e-5
    assert answer.model == MODEL and answer.usage.prompt_tokens == answer.usage.total_tokens > 0
    # the openai client asks for base64 by default and decodes it (so the above was base64);
    # asked for base64 explicitly, it hands the strings over; floats come as JSON numbers
    packed = client.embeddings.create(model=MODEL, input=texts[:5], encoding_format="base64",
                                      extra_body={"truncate_prompt_tokens": -1})  # fmt: skip
    decoded = np.stack(
        [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in packed.data]
    )
    assert np.abs(decoded - expected[:5]).max() < 1e-5
    floats = httpx.post(f"{client.base_url}embeddings", json={
        "model": MODEL, "input": texts[:5], "encoding_format": "float",
        "truncate_prompt_tokens": -1}).json()  # fmt: skip
    assert np.abs(np.array([d["embedding"] for d in floats["data"]]) - expected[:5]).max() < 1e-5


def test_token_id_inputs(client: openai.OpenAI, reference, minilm_dir) -> None:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(minilm_dir)("Paris is in France")["input_ids"]
    one = client.embeddings.create(model=MODEL, input=ids)
    two = client.embeddings.create(model=MODEL, input=[ids, ids[:3]])
    expected = reference.encode(["Paris is in France"], normalize_embeddings=True)[0]
    assert np.abs(np.array(one.data[0].embedding) - expected).max() < 1e-5
    assert two.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    assert one.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [({"input": "word " * 400}, "input", "truncate_prompt_tokens"),
     ({"input": "hi", "dimensions": 64}, "dimensions", "Matryoshka"),
     ({"input": []}, "input", "empty"),
     ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "base64"),
     ({"input": [[5, 10**9]]}, "input", "token ids"),
     ({"input": "hi", "model": "nope"}, "model", "does not exist")],
    ids=["too-long", "dimensions", "empty", "encoding", "out-of-vocabulary", "unknown-model"],
)  # fmt: skip
def test_bad_requests_are_400s_naming_the_field(server: Server, body, param, says) -> None:
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, **body}, timeout=60)
    assert answer.status_code in (400, 404), answer.text
    error = answer.json()["error"]
    assert error["param"] == param and says in error["message"]


def test_a_pooling_server_refuses_to_chat(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="pooling model"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])


def test_answers_validate_against_openais_spec(server: Server, validate) -> None:  # noqa: F811
    # one input per request, so both run alone in a step: packed with others, a prompt's
    # floats may differ in the last bits (other batch shapes, other kernels)
    body = {"model": MODEL, "input": ["one and two"]}
    floats = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()
    validate("CreateEmbeddingResponse", floats)
    # base64: a string, as OpenAI's API sends it and its client reads it, though the spec types
    # the field as an array only; decoded, it is the same floats
    answer = httpx.post(f"{server.url}/v1/embeddings", json={**body, "encoding_format": "base64"})
    packed = answer.json()
    for item, plain in zip(packed["data"], floats["data"], strict=True):
        item["embedding"] = np.frombuffer(base64.b64decode(item["embedding"]), "<f4").tolist()
        assert item["embedding"] == pytest.approx(plain["embedding"], abs=1e-7)
    validate("CreateEmbeddingResponse", packed)


def test_pooling_score_and_rerank_by_cosine(server: Server, reference) -> None:
    texts = ["A man is eating food.", "A man is eating pasta.", "The sky is blue today."]
    expected = reference.encode(texts, normalize_embeddings=True)
    pooled = httpx.post(f"{server.url}/pooling", json={"input": texts[:1]}, timeout=60).json()
    assert pooled["object"] == "list" and pooled["data"][0]["object"] == "pooling"
    assert np.abs(np.array(pooled["data"][0]["data"]) - expected[0]).max() < 1e-5
    scored = httpx.post(f"{server.url}/score", timeout=60,
                        json={"text_1": texts[0], "text_2": texts[1:]}).json()  # fmt: skip
    cosines = [float(expected[0] @ expected[i]) for i in (1, 2)]
    assert [d["score"] for d in scored["data"]] == pytest.approx(cosines, abs=1e-5)
    reranked = httpx.post(f"{server.url}/v1/rerank", timeout=60,
                          json={"query": texts[0], "documents": texts[1:][::-1]}).json()  # fmt: skip
    assert [r["index"] for r in reranked["results"]] == [1, 0]  # pasta first
    assert reranked["results"][0]["relevance_score"] == pytest.approx(cosines[0], abs=1e-5)
    refused = httpx.post(f"{server.url}/classify", json={"input": "hi"}, timeout=60)
    assert refused.status_code == 400 and "--convert classify" in refused.json()["error"]["message"]


def test_messages_need_a_chat_template(server: Server) -> None:
    answer = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                        json={"messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert answer.status_code == 400 and "chat template" in answer.json()["error"]["message"]
    both = httpx.post(f"{server.url}/v1/embeddings", timeout=60,
                      json={"input": "hi", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert both.status_code == 400 and "either `input` or `messages`" in both.text


SEED_003_CLIENT = """
from openai import OpenAI

client = OpenAI(
    base_url="{base_url}",
    api_key="EMPTY",
)

# Request embeddings for a list of texts
response = client.embeddings.create(
    model="{model}",
    input=["Hello world", "Machine learning is fascinating"]
)

# Print the vector for the first input
print(f"Vector length: {{len(response.data[0].embedding)}}")
print(f"First 5 dimensions: {{response.data[0].embedding[:5]}}")
"""


def test_seed_003_client_runs(server: Server, reference, tmp_path) -> None:
    """Seed 003's embeddings client as written, but for the base URL and the model."""
    import subprocess
    import sys

    script = tmp_path / "client.py"
    script.write_text(SEED_003_CLIENT.format(base_url=f"{server.url}/v1", model=MODEL))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = reference.encode(["Hello world"], normalize_embeddings=True)[0]
    lines = done.stdout.splitlines()
    assert lines[0] == "Vector length: 384"
    printed = [float(x) for x in lines[1].split("[", 1)[1].rstrip("]").split(",")]
    assert printed == pytest.approx(first[:5].tolist(), abs=1e-5)
