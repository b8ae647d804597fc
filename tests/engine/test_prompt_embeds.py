"""Prompts given as embeddings (vLLM's prompt_embeds): greedy tokens equal HF transformers'
generate(inputs_embeds=...) in fp32, batched beside token prompts, chunked, prefix-cached and
preempted alike."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve import LLM, BeamSearchParams, SamplingParams
from tests.engine.test_llm import (
    SCENARIOS,
    PreemptionCounter,
    assert_no_blocks_held,
    random_prompts,
)

NUM_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(tiny_model_dirs) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs["llama"], dtype=torch.float32
    ).eval()


def _embeddings(hf: torch.nn.Module, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Not any token's embedding: each row a token's plus noise, as a soft prompt would be."""
    gen = torch.Generator().manual_seed(seed)
    table = hf.get_input_embeddings().weight.detach()
    return [
        table[torch.tensor(ids)] + 0.05 * torch.randn(len(ids), table.shape[1], generator=gen)
        for ids in random_prompts(lengths, seed)
    ]


def _hf_greedy(hf: torch.nn.Module, embeds: torch.Tensor) -> list[int]:
    out = hf.generate(inputs_embeds=embeds[None], max_new_tokens=NUM_NEW, do_sample=False,
                      pad_token_id=0, eos_token_id=None)  # fmt: skip
    return out[0].tolist()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_from_embeddings_matches_hf(tiny_model_dirs, hf, scenario: str) -> None:
    args = {"max_model_len": 100, "kv_cache_memory_gb": 0.02, **SCENARIOS[scenario]}
    llm = LLM(str(tiny_model_dirs["llama"]), enable_prompt_embeds=True, **args)
    counter = PreemptionCounter(llm)
    llm.step_hook = counter
    embeds = _embeddings(hf, [7, 19, 33, 40, 28, 36], seed=4)
    token_prompts = random_prompts([11, 25, 30], seed=5)
    prompts = [{"prompt_embeds": e} for e in embeds]
    prompts += [{"prompt_token_ids": p} for p in token_prompts]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for embed, output in zip(embeds, outputs, strict=False):
        assert output.outputs[0].token_ids == _hf_greedy(hf, embed)
        assert len(output.prompt_token_ids) == len(embed)
    table = hf.get_input_embeddings().weight.detach()
    for ids, output in zip(token_prompts, outputs[len(embeds) :], strict=True):
        assert output.outputs[0].token_ids == _hf_greedy(hf, table[torch.tensor(ids)])
    if scenario.startswith("preemption"):
        assert counter.preempted
    assert_no_blocks_held(llm)


def test_embeddings_share_kv_only_with_the_same_embeddings(tiny_model_dirs, hf) -> None:
    llm = LLM(
        str(tiny_model_dirs["llama"]),
        enable_prompt_embeds=True,
        max_model_len=100,
        kv_cache_memory_gb=0.05,
    )
    first, second = _embeddings(hf, [40, 40], seed=6)
    once = llm.generate({"prompt_embeds": first}, GREEDY, use_tqdm=False)[0]
    again = llm.generate({"prompt_embeds": first}, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 32 and again.outputs == once.outputs  # two full blocks
    other = llm.generate({"prompt_embeds": second}, GREEDY, use_tqdm=False)[0]
    assert other.num_cached_tokens == 0  # same placeholder ids, different embeddings
    assert other.outputs[0].token_ids == _hf_greedy(hf, second)


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (torch.zeros(3, 7), r"shape \[num_tokens, 64\]"),
        (torch.full((3, 64), float("nan")), "finite"),
        (torch.zeros(3, 64, dtype=torch.int64), "finite floating-point"),
        (torch.zeros(300, 64), "longer than the maximum model length"),
        (b"not a tensor", "torch.save"),
        ({"a": 1}, "dense tensor"),
    ],
    ids=["hidden-size", "nan", "integers", "too-long", "garbage", "not-a-tensor"],
)
def test_bad_embeddings_are_refused_before_queueing(tiny_model_dirs, value, needle) -> None:
    llm = LLM(
        str(tiny_model_dirs["llama"]),
        enable_prompt_embeds=True,
        max_model_len=100,
        kv_cache_memory_gb=0.05,
    )
    with pytest.raises(ValueError, match=needle):
        llm.generate({"prompt_embeds": value}, GREEDY, use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()


def test_saved_bytes_and_the_switch(tiny_model_dirs, hf) -> None:
    (embeds,) = _embeddings(hf, [9], seed=7)
    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    llm = LLM(
        str(tiny_model_dirs["llama"]),
        enable_prompt_embeds=True,
        max_model_len=100,
        kv_cache_memory_gb=0.05,
    )
    out = llm.generate({"prompt_embeds": buffer.getvalue()}, GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == _hf_greedy(hf, embeds)
    with pytest.raises(ValueError, match="repetition_penalty"):
        llm.generate({"prompt_embeds": embeds},
                     SamplingParams(max_tokens=2, repetition_penalty=1.2), use_tqdm=False)  # fmt: skip
    with pytest.raises(ValueError, match="not embeddings"):
        llm.beam_search({"prompt_embeds": embeds}, BeamSearchParams(beam_width=2, max_tokens=2))
    off = LLM(str(tiny_model_dirs["llama"]), max_model_len=100, kv_cache_memory_gb=0.05)
    with pytest.raises(ValueError, match="--enable-prompt-embeds"):
        off.generate({"prompt_embeds": embeds}, GREEDY, use_tqdm=False)
