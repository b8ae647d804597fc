"""Sampling features end to end through `LLM`: logprobs against HF, seeds, n > 1, stops, aborts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve import LLM, SamplingParams
from lmserve.engine.input_processor import ProcessedPrompt
from tests.engine.test_llm import assert_no_blocks_held, random_prompts


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dirs) -> LLM:
    llm = LLM(str(tiny_model_dirs["llama"]), kv_cache_memory_gb=0.01, max_num_batched_tokens=8)
    llm.step_hook = llm.engine_core.check_invariants
    return llm


def test_logprobs_equal_hf_log_softmax(tiny_llm: LLM, tiny_model_dirs) -> None:
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], dtype=torch.float32)
    prompt = random_prompts([21], seed=5)[0]
    params = SamplingParams(
        temperature=0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3
    )
    out = tiny_llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    completion = out.outputs[0]
    tokens = prompt + completion.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)
    # sampled tokens: their logprob, rank 1 (greedy), and the top-5 set
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == 1
        top = row.topk(5)
        for lp, tid in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            assert entry[tid].logprob == pytest.approx(lp, abs=1e-4)
    expected_cum = sum(
        ref[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion.token_ids)
    )
    assert completion.cumulative_logprob == pytest.approx(expected_cum, abs=1e-3)
    # prompt logprobs: None for the first token, then each prompt token given its prefix,
    # computed across chunks of 8 tokens
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        entry = out.prompt_logprobs[i]
        assert entry[prompt[i]].logprob == pytest.approx(ref[i - 1, prompt[i]].item(), abs=1e-4)
        expected_rank = int((ref[i - 1] > ref[i - 1, prompt[i]]).sum()) + 1
        assert entry[prompt[i]].rank == expected_rank
        assert len(entry) >= 3


def test_seeded_sampling_ignores_batch_composition(tiny_model_dirs) -> None:
    prompt = random_prompts([13], seed=9)[0]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    noise = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    others = [{"prompt_token_ids": p} for p in random_prompts([7, 30, 2, 50], seed=10)]

    alone_llm = LLM(str(tiny_model_dirs["llama"]), kv_cache_memory_gb=0.01)
    alone = alone_llm.generate([{"prompt_token_ids": prompt}], seeded, use_tqdm=False)
    alone_tokens = alone[0].outputs[0].token_ids
    # a different batch, chunked and preempted, on a fresh engine with another global seed
    crowded_llm = LLM(
        str(tiny_model_dirs["llama"]),
        num_kv_blocks=30,
        block_size=4,
        max_model_len=100,
        max_num_batched_tokens=8,
        seed=99,
    )
    crowded = crowded_llm.generate(
        [others[0], {"prompt_token_ids": prompt}, *others[1:]],
        [noise, seeded, noise, noise, noise],
        use_tqdm=False,
    )
    assert crowded_llm.engine_core.scheduler.num_preemptions > 0
    assert crowded[1].outputs[0].token_ids == alone_tokens
    unseeded = alone_llm.generate([{"prompt_token_ids": prompt}], noise, use_tqdm=False)
    assert unseeded[0].outputs[0].token_ids != alone_tokens


def test_n_samples_share_the_prompt_blocks(tiny_model_dirs) -> None:
    llm = LLM(str(tiny_model_dirs["qwen2"]), kv_cache_memory_gb=0.01, block_size=4)
    prompt = random_prompts([18], seed=3)[0]
    shared: list[bool] = []

    def hook() -> None:
        kv = llm.engine_core.scheduler.kv
        tables = [kv.block_ids(f"{0}-{i}") for i in range(3)]
        if all(tables):
            # 18 prompt tokens = 4 full blocks of 4, held once, referenced by all three samples
            shared.append(tables[0][:4] == tables[1][:4] == tables[2][:4])
        kv.check_invariants()

    llm.step_hook = hook
    params = SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert shared and all(shared)
    assert_no_blocks_held(llm)


def test_stop_string_split_across_tokens(smollm2_llm: LLM) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
    greedy = SamplingParams(temperature=0, max_tokens=40)
    full = smollm2_llm.chat(messages, greedy, use_tqdm=False)[0].outputs[0]
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the end of one token and the start of the next
    i = next(
        i for i in range(len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1]) >= 2
    )
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    cut = full.text.index(stop)
    out = smollm2_llm.chat(
        messages, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False
    )
    completion = out[0].outputs[0]
    assert completion.text == full.text[:cut]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", stop)
    kept = smollm2_llm.chat(
        messages,
        SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert kept.text == full.text[: cut + len(stop)]
    assert_no_blocks_held(smollm2_llm)


def test_stop_token_ids_min_tokens_and_eos(smollm2_llm: LLM) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    full = smollm2_llm.chat(messages, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    tokens = full[0].outputs[0].token_ids
    eos = smollm2_llm.get_tokenizer().eos_token_id
    assert tokens[-1] == eos and full[0].outputs[0].stop_reason is None

    third = tokens[2]
    stopped = smollm2_llm.chat(
        messages,
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[third]),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.token_ids == tokens[: tokens.index(third) + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", third)

    longer = smollm2_llm.chat(
        messages,
        SamplingParams(temperature=0, max_tokens=60, min_tokens=len(tokens) + 5),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(longer.token_ids) >= len(tokens) + 5
    assert eos not in longer.token_ids[: len(tokens) + 5]


def test_skip_special_tokens(smollm2_llm: LLM) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    forced = dict(temperature=0, max_tokens=2, ignore_eos=True, logit_bias={start: 100.0})
    prompt = [{"prompt_token_ids": tokenizer.encode("Hello")}]
    skipped = smollm2_llm.generate(prompt, SamplingParams(**forced), use_tqdm=False)[0].outputs[0]
    kept = smollm2_llm.generate(
        prompt, SamplingParams(**forced, skip_special_tokens=False), use_tqdm=False
    )[0].outputs[0]
    assert skipped.token_ids == kept.token_ids == [start, start]
    assert skipped.text == ""
    assert kept.text == "<|im_start|><|im_start|>"


def test_abort_frees_blocks_at_once(tiny_llm: LLM) -> None:
    core = tiny_llm.engine_core
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(random_prompts([30, 12], seed=4)):
        prompt_in = ProcessedPrompt(None, prompt)
        core.add_request(tiny_llm.input_processor.make_request(f"abort-{i}", prompt_in, params))
    for _ in range(3):
        core.step()
        core.check_invariants()
    kv = core.scheduler.kv
    assert kv.num_free_blocks < kv.pool.num_usable_blocks
    core.abort_requests(["abort-0", "abort-1", "unknown"])
    assert_no_blocks_held(tiny_llm)
    assert not core.has_unfinished_requests()
    # the worker forgets them at the next step
    tiny_llm.generate(
        [{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False
    )
    assert not {"abort-0", "abort-1"} & set(core.runner.batch.row_of)


def test_interrupted_generate_leaves_nothing_queued(tiny_llm: LLM) -> None:
    steps = 0

    def interrupt() -> None:
        nonlocal steps
        steps += 1
        if steps == 3:
            raise KeyboardInterrupt

    tiny_llm.step_hook = interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            tiny_llm.generate(
                [{"prompt_token_ids": p} for p in random_prompts([20, 9], seed=6)],
                SamplingParams(max_tokens=30),
                use_tqdm=False,
            )
    finally:
        tiny_llm.step_hook = tiny_llm.engine_core.check_invariants
    assert not tiny_llm.engine_core.has_unfinished_requests()
    assert not tiny_llm.output_processor.has_unfinished()
    assert_no_blocks_held(tiny_llm)
