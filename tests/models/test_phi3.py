"""Phi-3 (fused qkv_proj and gate_up_proj in the checkpoint, a 40-token sliding window on every
layer) on the Llama implementation: greedy tokens equal HF's, batched, chunked and preempted;
what it does not support says so."""

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


@pytest.fixture(scope="module")
def phi3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_phi3")
    torch.manual_seed(5)
    model = tf.Phi3ForCausalLM(tf.Phi3Config(**_COMMON, pad_token_id=0, sliding_window=40))
    _randomize(model)
    model.save_pretrained(root)
    return root, model.eval()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"max_num_batched_tokens": 8},
        {"num_kv_blocks": 30, "block_size": 4, "max_model_len": 100},
    ],
    ids=["batched", "chunked", "preempted"],
)
def test_greedy_equals_hf(phi3, options: dict) -> None:
    path, hf = phi3
    # no token 0: HF's generate would take it for padding (pad_token_id 0) and mask it out
    prompts = [[t or 1 for t in p] for p in random_prompts([5, 17, 33, 9], seed=3)]
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    llm = LLM(str(path), **{"kv_cache_memory_gb": 0.05, **options})
    counter = PreemptionCounter(llm)
    llm.step_hook = counter
    assert run_greedy(llm, prompts) == expected
    assert counter.preempted == ("num_kv_blocks" in options)
    assert_no_blocks_held(llm)


def test_partial_rotary_is_refused(tmp_path: Path) -> None:
    import transformers as tf

    config = tf.Phi3Config(**_COMMON, pad_token_id=0, partial_rotary_factor=0.75)
    tf.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.75"):
        LLM(str(tmp_path))


@pytest.fixture(scope="module")
def phi3_longrope(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """Phi-3 128k's layout at a tiny scale: pretrained on 64 tokens, extended to 256 by
    LongRoPE, with long factors far from the short ones so the choice shows in the tokens."""
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_phi3_longrope")
    torch.manual_seed(6)
    head_dim = _COMMON["hidden_size"] // _COMMON["num_attention_heads"]
    config = tf.Phi3Config(
        **{**_COMMON, "max_position_embeddings": 256},
        pad_token_id=0,
        original_max_position_embeddings=64,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
            "long_factor": [1.0 + 3.0 * i for i in range(head_dim // 2)],
        },
    )
    model = tf.Phi3ForCausalLM(config)
    _randomize(model)
    model.save_pretrained(root)
    return root, model.eval()


@pytest.mark.parametrize(
    ("options", "lengths", "long_context"),
    [
        ({"max_model_len": 64}, [17, 33, 20, 40], False),
        ({}, [70, 90, 66, 100], True),
        ({"max_num_batched_tokens": 32}, [70, 90, 66, 100], True),
    ],
    ids=["short-context", "long-prompts", "long-prompts-chunked"],
)
def test_longrope_greedy_equals_hf(phi3_longrope, options, lengths, long_context) -> None:
    """Within the pretrained context the short factors, past it the long ones: HF's choice for
    every sequence when max_model_len stays within 64 tokens, and for prompts already past 64
    when it does not. Run twice: the second time from the prefix cache."""
    path, hf = phi3_longrope
    prompts = [[t or 1 for t in p] for p in random_prompts(lengths, seed=8)]
    expected = [hf_greedy(hf, p, 20) for p in prompts]
    llm = LLM(str(path), **options)
    assert llm.config.model.hf_config["rope_parameters"]["long_context"] is long_context
    assert run_greedy(llm, prompts) == expected
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(o.num_cached_tokens > 0 for o in outputs)
    for prompt, output, tokens in zip(prompts, outputs, expected, strict=True):
        assert list(output.outputs[0].token_ids) == tokens
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        reference = logits.log_softmax(-1).max(-1).values
        ours = [next(iter(step.values())).logprob for step in output.outputs[0].logprobs]
        torch.testing.assert_close(torch.tensor(ours), reference, atol=1e-4, rtol=0)
    assert_no_blocks_held(llm)
