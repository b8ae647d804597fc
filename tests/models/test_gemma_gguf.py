"""Gemma-3-270m from its Q4_K_M GGUF, served by `lmserve serve` under its Hub name: greedy
completions through the official client equal HF transformers loading the same file, for a
prompt past the 512-token sliding window too, dequantized (`--dtype float32`) and as it loads
by default, `-q gguf` (every tensor, Q5_0 / Q8_0 / Q4_K / Q6_K, kept in its blocks)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmserve.models.source import GEMMA3_MODEL
from tests.api.conftest import Server, launch_server, stop_server, wait_until_healthy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    # ~700 tokens: the sliding layers see only the last 512 of them
    "Once upon a time, in a small village by the sea, " * 60 + "the fisherman said",
]
MAX_TOKENS = 16


def _hf_tokens(gemma3_gguf: Path, gemma3_dir: Path) -> list[list[int]]:
    """HF's greedy tokens, with HF's model loaded from the GGUF itself."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gemma3_gguf.parent, gguf_file=gemma3_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    tokens = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        tokens.append(out[0, ids.shape[1] :].tolist())
    return tokens


@pytest.fixture(scope="module")
def served(
    gemma3_gguf: Path, gemma3_dir: Path
) -> Iterator[tuple[dict[str, Server], list[list[int]]]]:
    """The servers (float32, the default: -q gguf), and HF's tokens computed while they load (HF reads the
    GGUF's 262k-token vocabulary twice: half a minute)."""
    args = ("--max-model-len", "2048", "--kv-cache-memory-gb", "0.2")
    servers = {
        "float32": launch_server(GEMMA3_MODEL, *args, "--dtype", "float32"),
        "gguf": launch_server(GEMMA3_MODEL, *args),
    }
    try:
        tokens = _hf_tokens(gemma3_gguf, gemma3_dir)
        yield {k: wait_until_healthy(s) for k, s in servers.items()}, tokens
    finally:
        for server in servers.values():
            stop_server(server)


@pytest.mark.parametrize("weights", ["float32", "gguf"])
def test_served_completions_equal_hf_on_the_same_gguf(served, gemma3_dir, weights: str) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    servers, hf_tokens = served
    server = servers[weights]
    tokenizer = AutoTokenizer.from_pretrained(gemma3_dir)
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [GEMMA3_MODEL]
    for prompt, expected in zip(PROMPTS, hf_tokens, strict=True):
        reply = client.completions.create(
            model=GEMMA3_MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            logprobs=1,
            extra_body={"return_tokens_as_token_ids": True},  # vLLM's: "token_id:{id}"
        )
        choice = reply.choices[0]
        ours = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
        assert ours == expected[: len(ours)]
        assert choice.text == tokenizer.decode(expected[: len(ours)])
        assert len(ours) == MAX_TOKENS or choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 512  # the last prompt ran past the window
