"""End to end through `LLM`: greedy tokens must equal HF transformers in fp32, whatever the
batching, chunking, prefix caching or preemption; the block pool stays consistent every step."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

NUM_NEW = 20


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist() for n in lengths]


def hf_greedy(model: torch.nn.Module, prompt: list[int], num_new: int) -> list[int]:
    out = model.generate(  # no EOS, as ignore_eos on our side
        torch.tensor([prompt]),
        max_new_tokens=num_new,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    return out[0, len(prompt) :].tolist()


class PreemptionCounter:
    """Step hook: checks the block pool's invariants and records whether anything was preempted."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.preempted = False

    def __call__(self) -> None:
        scheduler = self.llm.engine_core.scheduler
        self.llm.engine_core.check_invariants()
        self.preempted |= scheduler.num_preemptions > 0


def run_greedy(llm: LLM, prompts: list[list[int]], num_new: int = NUM_NEW) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def assert_no_blocks_held(llm: LLM) -> None:
    kv = llm.engine_core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_usable_blocks


SCENARIOS = {
    "batched": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=16),
    "no_prefix_caching": dict(enable_prefix_caching=False, max_num_batched_tokens=8),
    "preemption": dict(num_kv_blocks=30, block_size=4, max_model_len=100),
    "preemption_chunked": dict(
        num_kv_blocks=30, block_size=4, max_model_len=100, max_num_batched_tokens=8
    ),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_matches_hf(tiny_model_dirs, hf_models, kind: str, scenario: str) -> None:
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    expected = [hf_greedy(hf_models[kind], p, NUM_NEW) for p in prompts]
    llm = LLM(str(tiny_model_dirs[kind]), kv_cache_memory_gb=0.01, **SCENARIOS[scenario])
    hook = PreemptionCounter(llm)
    llm.step_hook = hook
    single = run_greedy(llm, prompts[:1])
    assert single == expected[:1]
    assert run_greedy(llm, prompts) == expected
    # Mistral's window on every layer gives blocks back as requests grow: a running request
    # never outgrows its window, so the pool never runs short (Phi-3's longer one preempts)
    assert hook.preempted == (scenario.startswith("preemption") and kind != "mistral")
    assert_no_blocks_held(llm)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_matches_hf_without_the_cpu_kernels(
    tiny_model_dirs, hf_models, monkeypatch, kind: str
) -> None:
    """Where no C++ compiler built lmserve's CPU kernels, the plain-torch paths run instead."""
    from lmserve.kernels import cpu_ops

    monkeypatch.setattr(cpu_ops, "available", lambda: False)
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    expected = [hf_greedy(hf_models[kind], p, NUM_NEW) for p in prompts]
    llm = LLM(str(tiny_model_dirs[kind]), **SCENARIOS["preemption_chunked"])
    assert llm.engine_core.runner.backend.kernels is False  # every step through torch_ref
    llm.step_hook = hook = PreemptionCounter(llm)
    assert run_greedy(llm, prompts) == expected
    assert hook.preempted
    assert_no_blocks_held(llm)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_prefix_cache_hits_match_hf(tiny_model_dirs, hf_models, kind: str) -> None:
    shared = random_prompts([40], seed=1)[0]
    tails = random_prompts([3, 9, 21], seed=2)
    prompts = [shared + t for t in tails]
    expected = [hf_greedy(hf_models[kind], p, NUM_NEW) for p in prompts]
    llm = LLM(str(tiny_model_dirs[kind]), block_size=8, kv_cache_memory_gb=0.01)
    llm.step_hook = llm.engine_core.check_invariants
    first = llm.generate(
        [{"prompt_token_ids": prompts[0]}],
        SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True),
        use_tqdm=False,
    )
    assert first[0].num_cached_tokens == 0
    # Repeated prompt and shared-prefix prompts now hit the cache: the 40 shared tokens hold 5
    # full blocks of 8.
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == expected
    assert all(o.num_cached_tokens == 40 for o in again)
    assert_no_blocks_held(llm)
    llm.reset_prefix_cache()
    cold = llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)
    assert cold[0].num_cached_tokens == 0
    assert cold[0].outputs[0].token_ids == expected[0]


def test_a_sliding_window_request_holds_bounded_kv(tiny_model_dirs, hf_models) -> None:
    """Mistral's window (16 keys on every layer): a request 5x as long as the window equals HF's
    tokens while holding the blocks of about one window (measured through the block pool)."""
    prompt = random_prompts([20], seed=5)[0]
    expected = hf_greedy(hf_models["mistral"], prompt, 60)
    llm = LLM(
        str(tiny_model_dirs["mistral"]),
        block_size=4,
        max_num_batched_tokens=8,
        kv_cache_memory_gb=0.01,
    )
    kv = llm.engine_core.scheduler.kv
    assert kv.sliding_window == 16
    held = []

    def hook() -> None:
        llm.engine_core.check_invariants()
        held.append(kv.pool.num_usable_blocks - kv.num_free_blocks)

    llm.step_hook = hook
    assert run_greedy(llm, [prompt], num_new=60) == [expected]
    assert max(held) <= 16 // 4 + 2  # the window's blocks, a partial one, the next token's
    assert held[-1] == 0
    llm.reset_prefix_cache()
    assert kv.num_free_blocks == kv.pool.num_usable_blocks


def test_smollm2_greedy_matches_hf_on_gguf(smollm2_llm: LLM, hf_smollm2) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain what a KV cache is in one sentence.",
    ]
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        )
        for q in questions
    ]
    expected = []
    for p in prompts:
        out = hf_smollm2.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False)
        expected.append(out[0, len(p) :].tolist())
    params = SamplingParams(temperature=0, max_tokens=24)
    outputs = smollm2_llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert_no_blocks_held(smollm2_llm)


def test_chat_answers_paris(smollm2_llm: LLM) -> None:
    out = smollm2_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    completion = out[0].outputs[0]
    assert "Paris" in completion.text
    assert completion.finish_reason == "stop"


def test_prompt_longer_than_max_model_len_is_an_error(tiny_model_dirs) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), max_model_len=32, kv_cache_memory_gb=0.01)
    with pytest.raises(ValueError, match="longer than the maximum model length of 32"):
        llm.generate([{"prompt_token_ids": [1] * 10}, {"prompt_token_ids": [1] * 40}])
    # the valid prompt was not left queued
    assert not llm.engine_core.has_unfinished_requests()
    assert_no_blocks_held(llm)
    out = run_greedy(llm, [[1, 2, 3]], num_new=40)
    assert len(out[0]) == 29  # stops at max_model_len: 3 prompt + 29 outputs = 32


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["GPT2LMHeadModel"], "vocab_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8}'
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(tmp_path), load_format="dummy")


def test_dummy_weights_are_seeded_random_with_the_real_shapes(tiny_model_dirs) -> None:
    path = str(tiny_model_dirs["qwen3"])
    prompts = random_prompts([9, 4])
    first = run_greedy(LLM(path, load_format="dummy", seed=3, kv_cache_memory_gb=0.01), prompts)
    again = run_greedy(LLM(path, load_format="dummy", seed=3, kv_cache_memory_gb=0.01), prompts)
    other = run_greedy(LLM(path, load_format="dummy", seed=4, kv_cache_memory_gb=0.01), prompts)
    real = run_greedy(LLM(path, kv_cache_memory_gb=0.01), prompts)
    assert first == again and first != other and first != real
    assert all(len(tokens) == NUM_NEW for tokens in first)


def test_kv_cache_too_small_for_max_model_len_is_a_clear_error(tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="fewer than max_model_len=512"):
        LLM(str(tiny_model_dirs["llama"]), num_kv_blocks=4)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_int8_tokens_do_not_depend_on_batching(tiny_model_dirs, kind: str) -> None:
    """int8 is not exact against fp32, but its results must not depend on what else runs: a
    batch with chunked prefill and preemption gives each prompt's tokens run alone."""
    path = str(tiny_model_dirs[kind])
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    alone = LLM(path, quantization="int8", kv_cache_memory_gb=0.01)
    expected = [run_greedy(alone, [p])[0] for p in prompts]
    fp32 = run_greedy(LLM(path, kv_cache_memory_gb=0.01), prompts)
    assert expected != fp32  # the quantized model really runs
    llm = LLM(path, quantization="int8", **SCENARIOS["preemption_chunked"])
    hook = PreemptionCounter(llm)
    llm.step_hook = hook
    assert run_greedy(llm, prompts) == expected
    assert hook.preempted
    assert_no_blocks_held(llm)


def test_int8_chat_answers_paris() -> None:
    out = LLM(quantization="int8").chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(temperature=0, max_tokens=32),
        use_tqdm=False,
    )
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(quantization="int3"), "quantization must be one of"),
        (dict(quantization="int4", device="cuda"), "int4.*CPU only"),
        (dict(quantization="int4", dtype="bfloat16"), "int4.*computes in float32"),
        (dict(quantization="int8", device="cuda"), "int8.*CPU only"),
        (dict(quantization="gguf", device="cuda"), "gguf.*CPU only"),
        (dict(quantization="gguf", dtype="bfloat16"), "gguf.*computes in float32"),
        (dict(quantization="gguf", load_format="dummy"), "give a .gguf model"),
    ],
)
def test_bad_quantization_is_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(**kwargs)


def test_gguf_quantization_needs_a_gguf_model(tiny_model_dirs) -> None:
    with pytest.raises(ValueError, match="give a .gguf model"):
        LLM(str(tiny_model_dirs["llama"]), quantization="gguf")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_gpu_fp32_greedy_matches_hf(tiny_model_dirs, hf_models, kind: str, scenario: str) -> None:
    """fp32 on CUDA (Triton attention, no TF32): HF's CPU fp32 tokens in every scenario, with
    decode steps replayed from CUDA graphs and with --enforce-eager alike."""
    prompts = random_prompts([5, 17, 33, 64, 3, 1])
    expected = [hf_greedy(hf_models[kind], p, NUM_NEW) for p in prompts]
    for enforce_eager in (False, True):
        llm = LLM(
            str(tiny_model_dirs[kind]),
            device="cuda",
            dtype="float32",
            enforce_eager=enforce_eager,
            kv_cache_memory_gb=0.01,
            **SCENARIOS[scenario],
        )
        graphs = llm.engine_core.runner.graphs
        assert (graphs is None) == enforce_eager
        replays = _count_replays(graphs) if graphs is not None else []
        llm.step_hook = hook = PreemptionCounter(llm)
        assert run_greedy(llm, prompts) == expected
        assert hook.preempted == scenario.startswith("preemption")
        assert bool(replays) != enforce_eager
        assert_no_blocks_held(llm)


def _count_replays(graphs) -> list[int]:
    """Record the row count of every decode step the graphs run."""
    rows: list[int] = []
    run = graphs.run

    def counted(*args):
        rows.append(len(args[3]))
        return run(*args)

    graphs.run = counted
    return rows


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
def test_gpu_bf16_logprobs_are_as_close_to_fp32_as_hf_bf16(tiny_model_dirs, kind: str) -> None:
    """bf16 on CUDA: every prompt token's logprob (chunked prefill over the paged cache) is about
    as far from HF's fp32 value as HF's own bf16 forward on the same GPU."""
    path = str(tiny_model_dirs[kind])
    prompt = random_prompts([200], seed=3)[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    rows, targets = torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])
    with torch.no_grad():
        fp32 = torch.log_softmax(hf(ids).logits[0].float(), -1).cpu()[rows, targets]
        hf_bf16 = torch.log_softmax(hf.bfloat16()(ids).logits[0].float(), -1).cpu()[rows, targets]
    llm = LLM(path, device="cuda", dtype="bfloat16", kv_cache_memory_gb=0.01,
              max_num_batched_tokens=64)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    ours = torch.tensor([out.prompt_logprobs[i][prompt[i]].logprob for i in range(1, len(prompt))])
    our_err, hf_err = (ours - fp32).abs(), (hf_bf16 - fp32).abs()
    assert hf_err.max() > 0  # HF's bf16 really differs from fp32: the bound below means something
    assert our_err.mean() <= 1.5 * hf_err.mean() + 1e-3, (our_err.mean(), hf_err.mean())
    assert our_err.max() <= 2 * hf_err.max() + 1e-2, (our_err.max(), hf_err.max())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("quantization", [None, "int8"], ids=["fp32", "int8"])
def test_sleep_frees_memory_and_wake_up_restores_the_outputs(tiny_model_dirs, quantization) -> None:
    """Level 1 frees the KV cache, level 2 the weights too; after each wake-up the engine gives
    the tokens it gave before, and no prefix-cache hit survives the sleep."""
    path = str(tiny_model_dirs["llama"])
    prompts = random_prompts([20, 7])
    llm = LLM(path, enable_sleep_mode=True, kv_cache_memory_gb=0.25, block_size=8,
              quantization=quantization)  # fmt: skip
    expected = run_greedy(llm, prompts)
    runner = llm.engine_core.runner
    before = _rss_bytes()
    llm.sleep(level=1)
    assert before - _rss_bytes() > 0.2 * 2**30  # the 0.25 GiB cache went back to the OS
    assert all(layer.kv_cache is None for layer in runner.model.attention_layers())
    with pytest.raises(ValueError, match="asleep"):
        run_greedy(llm, prompts)
    llm.wake_up()
    again = llm.generate([{"prompt_token_ids": prompts[0]}], use_tqdm=False)
    assert again[0].num_cached_tokens == 0  # the cached prefix went with the cache
    assert run_greedy(llm, prompts) == expected
    llm.sleep(level=2)
    assert all(p.is_meta for p in runner.model.parameters())
    llm.wake_up()
    assert run_greedy(llm, prompts) == expected
    assert_no_blocks_held(llm)


def test_sleep_needs_sleep_mode_and_a_valid_level(tiny_model_dirs) -> None:
    path = str(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="--enable-sleep-mode"):
        LLM(path, kv_cache_memory_gb=0.01).sleep()
    llm = LLM(path, kv_cache_memory_gb=0.01, enable_sleep_mode=True)
    with pytest.raises(ValueError, match="1 or 2"):
        llm.sleep(level=3)
    llm.wake_up()  # awake already: nothing to do
    processed = llm.input_processor.tokenize_prompt({"prompt_token_ids": [1, 2, 3]})
    params = SamplingParams(max_tokens=2)
    (request,) = llm.input_processor.make_requests("busy", processed, params, None, None)
    llm.engine_core.add_request(request)
    with pytest.raises(ValueError, match="1 requests are unfinished"):
        llm.sleep()
    llm.engine_core.abort_requests([request.req_id])
    llm.sleep()
    assert llm.engine_core.sleep_level == 1


@pytest.mark.gpu
@needs_gpu
def test_gpu_sleep_moves_weights_off_the_gpu_and_wake_up_recaptures(tiny_model_dirs) -> None:
    path = str(tiny_model_dirs["llama"])
    prompts = random_prompts([20, 7, 3])
    llm = LLM(path, device="cuda", dtype="float32", enable_sleep_mode=True,
              kv_cache_memory_gb=0.25)  # fmt: skip
    expected = run_greedy(llm, prompts)
    before = torch.cuda.memory_allocated()
    llm.sleep(level=1)
    assert before - torch.cuda.memory_allocated() > 0.2 * 2**30
    assert next(llm.engine_core.runner.model.parameters()).device.type == "cpu"
    llm.wake_up()
    graphs = llm.engine_core.runner.graphs
    assert graphs is not None
    replays = _count_replays(graphs)
    assert run_greedy(llm, prompts) == expected and replays
    llm.sleep(level=2)
    llm.wake_up()
    assert run_greedy(llm, prompts) == expected
