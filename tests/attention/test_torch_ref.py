"""The torch reference backend's row slicing: gathering K/V a slice of rows at a time must not
change a single token."""

from __future__ import annotations

import pytest

from lmserve import LLM
from lmserve.attention import torch_ref
from tests.engine.test_llm import random_prompts, run_greedy


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_one_row_per_gather_gives_the_same_tokens(tiny_model_dirs, monkeypatch, kind) -> None:
    path = str(tiny_model_dirs[kind])
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    kwargs = dict(kv_cache_memory_gb=0.01, max_num_batched_tokens=24)  # mixed decode + chunks
    whole = run_greedy(LLM(path, **kwargs), prompts)
    monkeypatch.setattr(torch_ref, "_GATHER_BYTES", 1)  # every slice is one row
    assert run_greedy(LLM(path, **kwargs), prompts) == whole
