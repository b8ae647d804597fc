"""Speculative decoding end to end through `LLM`, with n-gram guesses and with a draft model:
greedy tokens identical to decoding without it in every engine scenario (and to HF), sampled
tokens distributed as without it, guesses actually accepted, and the block pool consistent
every step."""

from __future__ import annotations

import json

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.lora.request import LoRARequest
from lmserve.sampling_params import StructuredOutputsParams
from tests.engine.test_llm import (
    PreemptionCounter,
    assert_no_blocks_held,
    hf_greedy,
    random_prompts,
)

NUM_NEW = 24
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2,
        "prompt_lookup_max": 4}  # fmt: skip


def fifty_prompts() -> list[list[int]]:
    """25 random prompts and 25 that repeat their context (a chunk said two to four times),
    where guesses from the prompt come true. (No token 0: HF's generate masks its pad id.)"""
    plain = random_prompts([1, 3, 5, 9, 17, 33, 64, 80] * 3 + [40], seed=3)
    chunks = random_prompts([4, 7, 12, 20, 31] * 5, seed=4)
    repeated = [chunk * (2 + i % 3) for i, chunk in enumerate(chunks)]
    return [[t or 1 for t in p] for p in plain + repeated]


def greedy(llm: LLM, prompts: list[list[int]], **params) -> list[list[int]]:
    sampling = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, **params)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def engine(path, spec: dict | None = SPEC, **options) -> LLM:
    """A small-cache engine on `path`, speculating with `spec` (None: plain decoding)."""
    return LLM(str(path), **{"kv_cache_memory_gb": 0.02, **options}, speculative_config=spec)


def accepted(llm: LLM) -> int:
    return llm.engine_core.scheduler.stats().spec_num_accepted_tokens


SCENARIOS = {
    "batched": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=16),  # guesses cut to fit the budget
    "preemption": dict(
        num_kv_blocks=60, block_size=4, max_model_len=236, max_num_batched_tokens=64
    ),
    "no_prefix_caching": dict(enable_prefix_caching=False, max_num_batched_tokens=8),
}


@pytest.fixture(scope="module")
def plain_outputs(tiny_model_dirs) -> dict[str, list[list[int]]]:
    """Each model's greedy tokens without speculation (batching does not change them)."""
    return {
        kind: greedy(engine(tiny_model_dirs[kind], None), fifty_prompts())
        for kind in ("llama", "mistral")
    }


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_tokens_equal_plain_decoding(tiny_model_dirs, plain_outputs, scenario) -> None:
    llm = engine(tiny_model_dirs["llama"], **SCENARIOS[scenario])
    llm.step_hook = hook = PreemptionCounter(llm)
    assert greedy(llm, fifty_prompts()) == plain_outputs["llama"]
    assert accepted(llm) > 50  # guesses were checked and kept, not skipped
    assert hook.preempted == (scenario == "preemption")
    assert_no_blocks_held(llm)


def test_equal_to_hf_and_from_the_prefix_cache(tiny_model_dirs, hf_models_spec) -> None:
    """A second pass hits the blocks the first (speculative) pass cached: only blocks of known
    tokens were published, so the hits hold the right KV."""
    prompts = fifty_prompts()[::5]
    expected = [hf_greedy(hf_models_spec, p, NUM_NEW) for p in prompts]
    llm = engine(tiny_model_dirs["llama"], block_size=4)
    llm.step_hook = llm.engine_core.check_invariants
    assert greedy(llm, prompts) == expected
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert sum(o.num_cached_tokens for o in again) > sum(len(p) for p in prompts) // 2
    # A prompt that is an earlier prompt plus its output hits every full block before its
    # last token, blocks written by checking guesses included: each was published once its
    # tokens were known, under their hash.
    longer = [p + e for p, e in zip(prompts, expected, strict=True) if 0 not in e]
    assert len(longer) >= 5
    out = llm.generate([{"prompt_token_ids": p} for p in longer], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in out] == [(len(p) - 1) // 4 * 4 for p in longer]
    assert [o.outputs[0].token_ids for o in out] == [
        hf_greedy(hf_models_spec, p, NUM_NEW) for p in longer
    ]
    assert_no_blocks_held(llm)


@pytest.fixture(scope="module")
def hf_models_spec(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dirs["llama"], dtype=torch.float32
    ).eval()


def test_sliding_window_model(tiny_model_dirs, plain_outputs) -> None:
    """Mistral's 16-token window: blocks leave the window while guesses are checked past it."""
    llm = engine(tiny_model_dirs["mistral"], block_size=4)
    llm.step_hook = llm.engine_core.check_invariants
    assert greedy(llm, fifty_prompts()) == plain_outputs["mistral"]
    assert accepted(llm) > 50
    assert_no_blocks_held(llm)


def test_logprobs_min_tokens_and_stops_as_without_it(tiny_model_dirs) -> None:
    """Each kept token has its own logprobs; min_tokens bans a stop token at each checked
    position by its own count; a stop token among accepted guesses ends the request there."""
    prompts = fifty_prompts()[25:35]
    plain, spec = engine(tiny_model_dirs["llama"], None), engine(tiny_model_dirs["llama"])
    stop = greedy(plain, prompts[:1])[0][3]  # a token the first prompt produces early
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, logprobs=3, stop_token_ids=[stop])
    with_min = SamplingParams(
        temperature=0, max_tokens=NUM_NEW, logprobs=3, stop_token_ids=[stop], min_tokens=6
    )
    for p in (params, with_min):
        want = plain.generate([{"prompt_token_ids": q} for q in prompts], p, use_tqdm=False)
        got = spec.generate([{"prompt_token_ids": q} for q in prompts], p, use_tqdm=False)
        for a, b in zip(want, got, strict=True):
            assert b.outputs[0].token_ids == a.outputs[0].token_ids
            assert b.outputs[0].finish_reason == a.outputs[0].finish_reason
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert x.keys() == y.keys()
                assert all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    assert accepted(spec) > 0
    assert_no_blocks_held(spec)


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_penalties_and_structured_outputs_decode_without_guesses(
    tiny_chat_dir, tiny_model_dirs, proposer
) -> None:
    """Requests whose sampling depends on each position's history are never given guesses;
    beside speculating requests in one batch, each still gets its own plain result."""
    prompts = fifty_prompts()[30:36]

    def spec_for(path) -> dict:
        return SPEC if proposer == "ngram" else {"model": str(path), "num_speculative_tokens": 3}

    plain = engine(tiny_model_dirs["llama"], None)
    spec = engine(tiny_model_dirs["llama"], spec_for(tiny_model_dirs["llama"]))
    mixed = [
        SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, **extra)
        for extra in ({}, {"repetition_penalty": 1.3}, {"frequency_penalty": 0.5}) * 2
    ]
    requests = [{"prompt_token_ids": p} for p in prompts]
    want = [o.outputs[0].token_ids for o in plain.generate(requests, mixed, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.generate(requests, mixed, use_tqdm=False)]
    assert got == want
    assert accepted(spec) > 0

    chat = engine(tiny_chat_dir, spec_for(tiny_chat_dir))
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    constrained = SamplingParams(
        temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema)
    )
    before = chat.engine_core.scheduler.stats().spec_num_drafts
    text = chat.generate(["Give me JSON: " * 3], constrained, use_tqdm=False)[0].outputs[0].text
    assert isinstance(json.loads(text)["a"], int)
    assert chat.engine_core.scheduler.stats().spec_num_drafts == before
    assert_no_blocks_held(chat)


def test_lora_requests_speculate_with_their_adapter(tiny_model_dirs, tmp_path) -> None:
    from tests.lora.test_lora import ALL_TARGETS, make_adapter

    base = tiny_model_dirs["llama"]
    adapter = make_adapter(base, tmp_path / "all", 1, 8, ALL_TARGETS)
    lora = LoRARequest("all", 1, str(adapter))
    prompts = fifty_prompts()[25:31]
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    loras = [lora, None] * 3
    outs = []
    for spec in (None, SPEC, draft(tiny_model_dirs, "llama")):
        llm = engine(base, spec, enable_lora=True)
        got = llm.generate(requests, params, use_tqdm=False, lora_request=loras)
        outs.append([o.outputs[0].token_ids for o in got])
        assert_no_blocks_held(llm)
    assert outs[0] == outs[1] == outs[2]  # the draft guesses without the adapter
    assert accepted(llm) > 0


@pytest.mark.parametrize("proposer", ["ngram", "draft_model"])
def test_sampled_tokens_are_distributed_as_the_models(
    tiny_model_dirs, hf_models_spec, proposer
) -> None:
    """3,000 seeded samples of 8 tokens at temperature 0.15 (where this tiny model's next token
    is likely but not certain, so guesses are accepted and rejected often). Each token's
    randomized probability integral transform under HF's distribution for its prefix,
    F(x - 1) + v p(x), is uniform and independent of the others exactly when the tokens are
    sampled from the model: a Kolmogorov-Smirnov test over all 24,000 of them. (Sampling a
    rejected guess's replacement without taking the guess out fails it at p < 1e-4.)"""
    from scipy.stats import kstest

    prompt, n, temperature = fifty_prompts()[30], 3000, 0.15
    spec = {**SPEC, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    if proposer == "draft_model":  # the model's own greedy guesses: right where it is likely
        spec = draft(tiny_model_dirs, "llama", 4)
    llm = engine(tiny_model_dirs["llama"], spec, kv_cache_memory_gb=0.05)
    params = [
        SamplingParams(temperature=temperature, max_tokens=8, ignore_eos=True, seed=i)
        for i in range(n)
    ]
    outputs = llm.generate([{"prompt_token_ids": prompt}] * n, params, use_tqdm=False)
    tokens = torch.tensor([o.outputs[0].token_ids for o in outputs])  # [n, 8]
    stats = llm.engine_core.scheduler.stats()
    assert n // 2 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens - n // 2
    assert_no_blocks_held(llm)

    with torch.no_grad():
        sequences = torch.cat([torch.tensor(prompt).expand(n, -1), tokens], 1)
        logits = hf_models_spec(sequences).logits[:, len(prompt) - 1 : -1]
    probs = torch.softmax(logits.float() / temperature, -1)
    below = (probs * (torch.arange(probs.shape[-1]) < tokens[..., None])).sum(-1)
    chosen = probs.gather(-1, tokens[..., None]).squeeze(-1)
    jitter = torch.rand(chosen.shape, generator=torch.Generator().manual_seed(0))
    assert kstest((below + jitter * chosen).flatten().numpy(), "uniform").pvalue > 1e-3


def draft(dirs, kind: str, k: int = 3) -> dict:
    """A draft-model spec: the tiny `kind` model guessing `k` tokens."""
    return {"model": str(dirs[kind]), "num_speculative_tokens": k}


def acceptance(llm: LLM) -> tuple[int, int]:
    stats = llm.engine_core.scheduler.stats()
    return stats.spec_num_accepted_tokens, stats.spec_num_draft_tokens


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_draft_model_greedy_tokens_equal_plain_decoding(
    tiny_model_dirs, plain_outputs, scenario
) -> None:
    """The target as its own draft guesses the target's tokens: nearly every guess comes true
    only where the draft's KV (caught up each step, written into the lookahead slots, kept
    across prefix hits, rebuilt after preemption) holds the right tokens. Another model's
    guesses nearly all fail. Both give the plain tokens."""
    for kind in ("llama", "mistral"):
        llm = engine(tiny_model_dirs["llama"], draft(tiny_model_dirs, kind), **SCENARIOS[scenario])
        llm.step_hook = hook = PreemptionCounter(llm)
        assert greedy(llm, fifty_prompts()) == plain_outputs["llama"]
        kept, guessed = acceptance(llm)
        if kind == "llama":
            assert kept >= 0.95 * guessed and guessed > 300
        else:
            assert kept < 0.1 * guessed
        assert hook.preempted == (scenario == "preemption")
        assert_no_blocks_held(llm)


def test_draft_model_keeps_its_kv_for_prefix_hits_and_across_sleep(tiny_model_dirs) -> None:
    """Blocks the prefix cache hands a later request hold the draft's KV too (the self-draft
    still guesses right from them), and sleep/wake-up frees and restores the draft with the
    target."""
    prompts = fifty_prompts()[::5]
    llm = engine(tiny_model_dirs["llama"], draft(tiny_model_dirs, "llama"), block_size=4,
                 enable_sleep_mode=True)  # fmt: skip
    llm.step_hook = llm.engine_core.check_invariants
    expected = greedy(llm, prompts)
    longer = [p + e for p, e in zip(prompts, expected, strict=True)]
    first = acceptance(llm)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": p} for p in longer], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in out] == [(len(p) - 1) // 4 * 4 for p in longer]
    kept, guessed = (b - a for a, b in zip(first, acceptance(llm), strict=True))
    assert kept >= 0.95 * guessed and guessed > 100
    runner = llm.engine_core.runner
    llm.sleep(level=2)
    assert all(p.is_meta for p in runner.draft.model.parameters())
    assert all(layer.kv_cache is None for layer in runner.draft.model.attention_layers())
    llm.wake_up()
    assert greedy(llm, prompts) == expected
    assert_no_blocks_held(llm)
