"""A decoder as an embedder (`lmserve serve QWEN2 --convert embed`) beside a chat server: its
embeddings, from text and from chat `messages`, equal HF's normalized last hidden state, and
mixed traffic on the two servers leaves nothing behind (no KV blocks, no waiting requests)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

from tests.api.conftest import Server, start_server, stop_server


@pytest.fixture(scope="module")
def embedder(tiny_pooling_dirs) -> Iterator[Server]:
    server = start_server(str(tiny_pooling_dirs["qwen2_causal"]), "--convert", "embed",
                          "--served-model-name", "qwen-embed", "--max-model-len", "256")  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def chat(tiny_chat_dir) -> Iterator[Server]:
    server = start_server(str(tiny_chat_dir), "--served-model-name", "chat",
                          "--max-model-len", "512")  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def hf_last_token(tiny_pooling_dirs):
    from transformers import AutoModel, AutoTokenizer

    path = tiny_pooling_dirs["qwen2_causal"]
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def embed(ids: list[int]) -> list[float]:
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return torch.nn.functional.normalize(hidden, dim=0).tolist()

    return embed, tokenizer


def test_text_and_messages_equal_hf(embedder: Server, hf_last_token) -> None:
    embed, tokenizer = hf_last_token
    client = openai.OpenAI(base_url=f"{embedder.url}/v1", api_key="x", max_retries=0)
    texts = ["Paris is the capital of France.", "hi", "Ünïcödé 🙂 " * 20]
    answer = client.embeddings.create(model="qwen-embed", input=texts)
    for text, item in zip(texts, answer.data, strict=True):
        assert item.embedding == pytest.approx(embed(tokenizer.encode(text)), abs=1e-5)
    messages = [{"role": "system", "content": "Embed this."},
                {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    chat_answer = httpx.post(f"{embedder.url}/v1/embeddings", timeout=60,
                             json={"model": "qwen-embed", "messages": messages}).json()  # fmt: skip
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert chat_answer["usage"]["prompt_tokens"] == len(ids)
    assert chat_answer["data"][0]["embedding"] == pytest.approx(embed(ids), abs=1e-5)
    # pooled prompts count in the token metrics, as generated ones do
    metrics = httpx.get(f"{embedder.url}/metrics", timeout=30).text
    counted = re.search(r"^lmserve:prompt_tokens_total\{.*\} (\S+)$", metrics, re.M)
    assert counted and float(counted.group(1)) == answer.usage.prompt_tokens + len(ids)
    done = re.search(r'^lmserve:request_success_total\{.*finished_reason="stop".*\} (\S+)$',
                     metrics, re.M)  # fmt: skip
    assert done and float(done.group(1)) == len(texts) + 1


def _gauges(server: Server) -> list[float]:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = (
        r"^lmserve:(num_requests_running|num_requests_waiting|kv_cache_usage_perc)\{.*\} (\S+)$"
    )
    return [float(m.group(2)) for m in re.finditer(pattern, text, re.M)]


def test_mixed_traffic_leaves_nothing_behind(embedder: Server, chat: Server) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            jobs = []
            for i in range(12):
                jobs.append(http.post(f"{embedder.url}/v1/embeddings",
                                      json={"input": [f"text {i}"] * (1 + i % 4)}))  # fmt: skip
                jobs.append(http.post(f"{chat.url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 8}))  # fmt: skip
            answers = await asyncio.gather(*jobs)
            assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
            # clients that leave mid-request
            for server, body, path in (
                (embedder, {"input": ["long text " * 100] * 512}, "/v1/embeddings"),
                (chat, {"messages": [{"role": "user", "content": "go"}], "max_tokens": 200},
                 "/v1/chat/completions"),
            ):  # fmt: skip
                with pytest.raises(httpx.TimeoutException):
                    await http.post(f"{server.url}{path}", json=body, timeout=0.05)

    asyncio.run(run())
    for server in (embedder, chat):
        for _ in range(100):
            if _gauges(server) and not any(_gauges(server)):
                break
            asyncio.run(asyncio.sleep(0.1))
        assert _gauges(server) and not any(_gauges(server)), _gauges(server)
