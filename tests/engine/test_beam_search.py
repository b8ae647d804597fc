"""Beam search (vLLM's LLM.beam_search / use_beam_search) against HF transformers'
generate(num_beams=...): the same sequences, best first, with the same scores, in fp32."""

from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmserve import LLM, BeamSearchParams, SamplingParams
from tests.engine.test_llm import assert_no_blocks_held, random_prompts

MAX_TOKENS = 12
PROMPTS = random_prompts([5, 13, 21, 8], seed=1)


@pytest.fixture(scope="module")
def eos_model(tiny_model_dirs: dict[str, Path], tmp_path_factory) -> tuple[Path, int]:
    """The tiny Llama with its EOS moved to a token it often ranks high, so beams finish on
    EOS as well as at max_tokens."""
    source = tiny_model_dirs["llama"]
    llm = LLM(str(source), max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=4)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    ranked = collections.Counter(t for o in outputs for e in o.outputs[0].logprobs for t in e)
    eos = ranked.most_common(1)[0][0]
    target = tmp_path_factory.mktemp("beam") / "llama"
    shutil.copytree(source, target)
    for name in ("config.json", "generation_config.json"):
        path = target / name
        if path.exists():
            config = json.loads(path.read_text())
            path.write_text(json.dumps({**config, "eos_token_id": eos}))
    return target, eos


def test_beams_equal_hf_generate(eos_model) -> None:
    path, eos = eos_model
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), max_model_len=256)
    reasons = set()
    for width in (2, 4):
        for penalty in (1.0, 0.0, 2.0):
            params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS,
                                      length_penalty=penalty)  # fmt: skip
            ours = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
            for prompt, result in zip(PROMPTS, ours, strict=True):
                theirs = hf.generate(
                    torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                    max_new_tokens=MAX_TOKENS, do_sample=False, length_penalty=penalty,
                    early_stopping=False, output_scores=True, return_dict_in_generate=True,
                    pad_token_id=0,
                )  # fmt: skip
                expected = [_upto_eos(s[len(prompt) :].tolist(), eos) for s in theirs.sequences]
                got = [seq.tokens[len(prompt) :] for seq in result.sequences]
                assert got == expected, (width, penalty)
                assert [seq.tokens[: len(prompt)] for seq in result.sequences] == [prompt] * width
                assert [s.score for s in result.sequences] == pytest.approx(
                    theirs.sequences_scores.tolist(), abs=1e-4
                )
                reasons |= {seq.finish_reason for seq in result.sequences}
    assert reasons == {"stop", "length"}  # both ways a beam ends were compared
    assert_no_blocks_held(llm)


def test_beams_share_their_prompts_blocks(tiny_model_dirs) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), max_model_len=256, kv_cache_memory_gb=0.02)
    prompt = random_prompts([40], seed=3)[0]
    params = BeamSearchParams(beam_width=3, max_tokens=8, ignore_eos=True)
    (result,) = llm.beam_search({"prompt_token_ids": prompt}, params)
    assert len(result.sequences) == 3 and all(s.finish_reason == "length" for s in result.sequences)
    assert all(len(s.tokens) == 48 for s in result.sequences)
    scheduler = llm.engine_core.scheduler
    # every step after the first finds at least the prompt's two full blocks cached, per beam
    assert scheduler.prefix_cache_hits >= 7 * 3 * 32
    assert_no_blocks_held(llm)


def test_more_beams_than_the_logprob_limit_says_what_to_do(tiny_model_dirs) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), max_model_len=64, kv_cache_memory_gb=0.02)
    with pytest.raises(ValueError, match="--max-logprobs 24"):
        llm.beam_search({"prompt_token_ids": [1, 2]}, BeamSearchParams(beam_width=12, max_tokens=2))


def _upto_eos(tokens: list[int], eos: int) -> list[int]:
    """HF pads a beam that ended early: its tokens up to and with the EOS."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
