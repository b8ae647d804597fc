"""Gemma 2 and Gemma 3 (text) through `LLM`: greedy tokens and logprobs equal HF's on tiny random
checkpoints shaped like the real ones (sliding-window and global layers interleaved, a window
much shorter than the prompts; Gemma 2's soft caps; Gemma 3's two RoPE bases and q/k norms),
single, batched, chunked, prefix-cached and preempted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.conftest import _COMMON, _randomize
from tests.engine.test_llm import (
    PreemptionCounter,
    assert_no_blocks_held,
    hf_greedy,
    random_prompts,
    run_greedy,
)

WINDOW = 8
LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]


def _gemma2():
    import transformers as tf

    config = tf.Gemma2Config(
        **{**_COMMON, "num_hidden_layers": 4},
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        layer_types=LAYERS,
        attn_logit_softcapping=1.0,  # low enough that the cap changes the scores
        final_logit_softcapping=3.0,
        pad_token_id=0,
    )
    return tf.Gemma2ForCausalLM(config)


def _gemma3():
    import transformers as tf

    config = tf.Gemma3TextConfig(
        **{**_COMMON, "num_hidden_layers": 4},
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=WINDOW,
        layer_types=LAYERS,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        pad_token_id=0,
    )
    return tf.Gemma3ForCausalLM(config)


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp(f"tiny_{request.param}")
    torch.manual_seed(7)
    model = _gemma2() if request.param == "gemma2" else _gemma3()
    _randomize(model)
    with torch.no_grad():  # zero-centred, as Gemma's norm weights are: (1 + w) near one
        for name, param in model.named_parameters():
            if "norm" in name:
                param.sub_(1.0)
    model.save_pretrained(root)
    return root, model.eval()


def _prompts() -> list[list[int]]:
    # no token 0: HF's generate would take it for padding (pad_token_id 0) and mask it out
    return [[t or 1 for t in p] for p in random_prompts([5, 17, 33, 9, 40], seed=4)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 8},
        {"num_kv_blocks": 40, "block_size": 4, "max_model_len": 100},
        {"attention_backend": "torch_ref", "max_num_batched_tokens": 12},
    ],
    ids=["batched", "chunked", "preempted", "torch_ref"],
)
def test_greedy_equals_hf(gemma, options: dict) -> None:
    path, hf = gemma
    prompts = _prompts()
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    llm = LLM(str(path), **{"kv_cache_memory_gb": 0.05, **options})
    assert llm.engine_core.scheduler.kv.sliding_window is None  # global layers see every key
    counter = PreemptionCounter(llm)
    llm.step_hook = counter
    assert run_greedy(llm, prompts[:1]) == expected[:1]
    assert run_greedy(llm, prompts) == expected
    assert counter.preempted == ("num_kv_blocks" in options)
    assert_no_blocks_held(llm)


def test_prefix_cached_requests_and_logprobs_equal_hf(gemma) -> None:
    path, hf = gemma
    shared = _prompts()[4][:32]
    prompts = [shared + tail for tail in ([3, 9], [4, 5, 6, 7, 8, 9, 10], [11])]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    llm = LLM(str(path), block_size=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [32, 32, 32]
    assert [o.outputs[0].token_ids for o in outputs] == expected
    for prompt, output in zip(prompts, outputs, strict=True):
        sequence = torch.tensor([prompt + list(output.outputs[0].token_ids)])
        with torch.no_grad():
            logits = hf(sequence).logits[0, len(prompt) - 1 : -1]
        reference = logits.log_softmax(-1).max(-1).values
        ours = [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(ours), reference, atol=1e-4, rtol=0)
    assert_no_blocks_held(llm)
