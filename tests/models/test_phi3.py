"""Phi-3 (fused qkv_proj and gate_up_proj in the checkpoint, a 40-token sliding window on every
layer) on the Llama implementation: greedy tokens equal HF's, batched, chunked and preempted;
what it does not support says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM
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
    llm = LLM(str(path), **options)
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
