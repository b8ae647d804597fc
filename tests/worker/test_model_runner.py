"""The model runner on CUDA: a step queues all its work and waits for the device once."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.engine.test_llm import random_prompts

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_gpu_step_waits_for_the_device_once(tiny_model_dirs, enforce_eager: bool) -> None:
    """Greedy, sampled, seeded, penalized, biased and logprob rows in one batch: every step
    that samples makes exactly one synchronizing CUDA call (copying the results back)."""
    llm = LLM(
        str(tiny_model_dirs["llama"]),
        kv_cache_memory_gb=0.01,
        max_num_seqs=8,
        max_num_batched_tokens=32,
        enforce_eager=enforce_eager,
    )
    core = llm.engine_core
    syncs_per_step: list[int] = []
    step = core.step

    def counting_step():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                result = step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs_per_step.append(sum("synchroniz" in str(w.message) for w in caught))
        return result

    params = [
        SamplingParams(temperature=0, max_tokens=8),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=8),
        SamplingParams(temperature=1.0, seed=7, min_p=0.05, max_tokens=8),
        SamplingParams(presence_penalty=0.5, repetition_penalty=1.2, max_tokens=8),
        SamplingParams(logit_bias={3: 2.0, 5: -100.0}, min_tokens=4, max_tokens=8),
        SamplingParams(temperature=0, logprobs=3, max_tokens=8),
    ]
    prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 17, 40, 3, 9, 60])]
    llm.generate(prompts, params, use_tqdm=False)  # compiles the kernels
    core.step = counting_step
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outputs)
    assert max(syncs_per_step) == 1 and syncs_per_step.count(1) >= 8, syncs_per_step
