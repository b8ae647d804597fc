"""`lmserve serve --speculative-config` on the bundled SmolLM2: the same greedy text as the
engine without speculation, through the official client, and vLLM's spec_decode counters on
/metrics and in the stats log; n-gram guesses, and the quantized GGUF drafting for the exact
float32 model."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from lmserve import SamplingParams
from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_server import MODEL

SPEC = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
EDIT = [{"role": "user", "content": (
    "Rewrite this Python function with type hints, keeping everything else the same:\n\n"
    "def area(width, height):\n    \"\"\"Return the area of a rectangle.\"\"\"\n"
    "    if width < 0 or height < 0:\n        raise ValueError(\"negative size\")\n"
    "    return width * height\n"
)}]  # fmt: skip


@pytest.fixture(scope="module")
def server(smollm2_dir):
    server = start_server(
        "--max-model-len", "2048", "--kv-cache-memory-gb", "0.25", "--speculative-config", SPEC,
        env={"LMSERVE_LOG_STATS_INTERVAL": "1"},
    )  # fmt: skip
    yield server
    stop_server(server)


def counter(text: str, name: str, **labels: str) -> float:
    found = 0.0
    for line in text.splitlines():
        if line.startswith(f"lmserve:{name}_total{{") and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            found += float(line.rsplit(" ", 1)[1])
    return found


def test_same_greedy_text_and_acceptance_counters(server: Server, smollm2_llm) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    reply = client.chat.completions.create(model=MODEL, messages=EDIT, max_tokens=80, temperature=0)
    plain = smollm2_llm.chat(EDIT, SamplingParams(temperature=0, max_tokens=80), use_tqdm=False)
    assert reply.choices[0].message.content == plain[0].outputs[0].text
    text = httpx.get(f"{server.url}/metrics").text
    drafts = counter(text, "spec_decode_num_draft_tokens")
    accepted = counter(text, "spec_decode_num_accepted_tokens")
    assert counter(text, "spec_decode_num_drafts") > 0
    assert 20 < accepted <= drafts  # an edit repeats its input: most guesses come true
    per_pos = [
        counter(text, "spec_decode_num_accepted_tokens_per_pos", position=str(p)) for p in range(4)
    ]
    assert sum(per_pos) == accepted and per_pos == sorted(per_pos, reverse=True)
    deadline = time.monotonic() + 10
    while not re.search(r"draft acceptance rate: \d+\.\d%", server.log()):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)


def test_sampling_and_streaming_with_speculation(server: Server) -> None:
    """A stream carries every token once, in order, however many a step accepted; a seeded
    sampled request repeats, guesses and all."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    whole = (
        client.chat.completions.create(model=MODEL, messages=EDIT, max_tokens=60, temperature=0)
        .choices[0]
        .message.content
    )
    stream = client.chat.completions.create(
        model=MODEL, messages=EDIT, max_tokens=60, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == whole

    def sample() -> list[str]:
        reply = client.chat.completions.create(
            model=MODEL, messages=EDIT, max_tokens=60, temperature=0.8, n=3, seed=7
        )
        assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
        return [c.message.content for c in reply.choices]

    assert sample() == sample()


@pytest.fixture(scope="module")
def draft_server(smollm2_dir):
    """The float32 model (the exact one), its guesses made by the same GGUF kept in its Q4_1
    blocks: a draft that agrees with it on nearly every token, at a fraction of the reads."""
    draft = '{"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "num_speculative_tokens": 4}'
    server = start_server(
        "--max-model-len", "1024", "--kv-cache-memory-gb", "0.25", "--dtype", "float32",
        "--speculative-config", draft,
    )  # fmt: skip
    yield server
    stop_server(server)


def test_a_quantized_draft_model_keeps_the_exact_models_text(
    draft_server: Server, smollm2_llm
) -> None:
    client = openai.OpenAI(base_url=f"{draft_server.url}/v1", api_key="none")
    question = [{"role": "user", "content": "Name three uses of a paperclip."}]
    for messages in (EDIT, question):
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=64, temperature=0
        )
        plain = smollm2_llm.chat(
            messages, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False
        )
        assert reply.choices[0].message.content == plain[0].outputs[0].text
    text = httpx.get(f"{draft_server.url}/metrics").text
    drafts = counter(text, "spec_decode_num_draft_tokens")
    accepted = counter(text, "spec_decode_num_accepted_tokens")
    assert 0.7 * drafts < accepted <= drafts  # the Q4_1 model mostly agrees with float32
    stream = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=64, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == (
        plain[0].outputs[0].text
    )
