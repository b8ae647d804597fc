"""Mixture-of-experts models through `LLM`: Mixtral, Qwen2-MoE (gated shared expert, a dense
layer, unnormalized top-k), Qwen3-MoE (q/k norms, normalized top-k) and gpt-oss (biased router
and experts, top-k then softmax, a clamped SwiGLU, attention sinks, windowed and global layers,
YaRN RoPE) on tiny random checkpoints; greedy tokens and logprobs equal HF's, single, batched,
chunked, prefix-cached and preempted. LoRA is refused clearly."""

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

EXPERTS = dict(num_experts_per_tok=2, pad_token_id=0)


def _build(kind: str):
    import transformers as tf

    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(**_COMMON, num_local_experts=4, **EXPERTS))
    if kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **_COMMON,
            num_experts=6,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            mlp_only_layers=[1],  # a dense layer, intermediate_size wide
            **EXPERTS,
        )
        return tf.Qwen2MoeForCausalLM(config)
    if kind == "gpt_oss":
        config = tf.GptOssConfig(
            **{**_COMMON, "intermediate_size": 32},
            num_local_experts=4,
            head_dim=16,
            sliding_window=8,  # prompts and outputs run past it on the windowed layer
            swiglu_limit=1.0,  # low enough that the clamps bite
            **EXPERTS,
        )
        return tf.GptOssForCausalLM(config)
    config = tf.Qwen3MoeConfig(
        **_COMMON, num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, **EXPERTS
    )
    return tf.Qwen3MoeForCausalLM(config)


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def moe(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp(f"tiny_{request.param}")
    torch.manual_seed(11)
    model = _build(request.param)
    _randomize(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):  # as large as scores, so they take real weight
                param.normal_(0.0, 1.0)
    model.save_pretrained(root)
    return root, model.eval()


def _prompts() -> list[list[int]]:
    # no token 0: HF's generate would take it for padding (pad_token_id 0) and mask it out
    return [[t or 1 for t in p] for p in random_prompts([5, 17, 33, 9, 40], seed=6)]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 8},
        {"num_kv_blocks": 30, "block_size": 4, "max_model_len": 100},
    ],
    ids=["batched", "chunked", "preempted"],
)
def test_greedy_equals_hf(moe, options: dict) -> None:
    path, hf = moe
    prompts = _prompts()
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    llm = LLM(str(path), **{"kv_cache_memory_gb": 0.05, **options})
    counter = PreemptionCounter(llm)
    llm.step_hook = counter
    assert run_greedy(llm, prompts[:1]) == expected[:1]
    assert run_greedy(llm, prompts) == expected
    assert counter.preempted == ("num_kv_blocks" in options)
    assert_no_blocks_held(llm)


def test_prefix_cached_requests_and_logprobs_equal_hf(moe) -> None:
    path, hf = moe
    shared = _prompts()[4][:32]
    prompts = [shared + tail for tail in ([3, 9], [4, 5, 6, 7, 8, 9, 10], [11])]
    llm = LLM(str(path), block_size=8, kv_cache_memory_gb=0.05)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    llm.generate([{"prompt_token_ids": shared}], params, use_tqdm=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == [32, 32, 32]
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(hf, p, 12) for p in prompts]
    for prompt, output in zip(prompts, outputs, strict=True):
        sequence = torch.tensor([prompt + list(output.outputs[0].token_ids)])
        with torch.no_grad():
            logits = hf(sequence).logits[0, len(prompt) - 1 : -1]
        reference = logits.log_softmax(-1).max(-1).values
        ours = [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(ours), reference, atol=1e-4, rtol=0)
    assert_no_blocks_held(llm)


def test_int8_experts_give_each_prompt_its_tokens_alone(moe) -> None:
    """--quantization int8 covers the experts; its tokens do not depend on the batch."""
    from lmserve.layers.int8_linear import Int8FusedMoE

    path, _ = moe
    prompts = _prompts()
    llm = LLM(str(path), quantization="int8", max_num_batched_tokens=8, kv_cache_memory_gb=0.05)
    model = llm.engine_core.runner.model
    assert any(isinstance(m, Int8FusedMoE) for m in model.modules())
    alone = [run_greedy(llm, [p])[0] for p in prompts]
    assert run_greedy(llm, prompts) == alone
    assert alone != run_greedy(LLM(str(path)), prompts)  # the quantized experts really run


def test_lora_is_refused_clearly(moe) -> None:
    path, _ = moe
    with pytest.raises(
        ValueError, match="LoRA adapters are not supported for .*mixture-of-experts"
    ):
        LLM(str(path), enable_lora=True, kv_cache_memory_gb=0.05)
