"""The accuracy benchmark on the bundled SmolLM2: a model against itself agrees exactly; int8
stays close; the chunked perplexity is HF's on the same chunks, and llama.cpp's own tool (where
it is built) gives the same number on the same file."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from lmserve import LLM
from lmserve.benchmarks.accuracy import (
    _LLAMA_PERPLEXITY,
    QUESTIONS,
    _chunked_perplexity,
    _with_bos,
    add_arguments,
    main,
)


def _run(*argv: str, quantization: str | None, max_tokens: int = 32) -> dict:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--max-tokens", str(max_tokens), *argv])
    args.quantization = quantization
    return main(args)


def test_unquantized_agrees_with_itself(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run("--dtype", "float32", quantization=None, max_tokens=16)
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == result
    assert result["top1_agreement"] == 1.0 and result["mean_abs_logprob_diff"] == 0.0
    assert result["perplexity_reference"] == result["perplexity_quantized"]
    assert result["identical_greedy_answers"] == f"{len(QUESTIONS)}/{len(QUESTIONS)}"
    assert len(QUESTIONS) * 4 < result["num_tokens"] <= len(QUESTIONS) * 16


def test_a_model_without_a_chat_template_answers_completions(smollm2_dir, tmp_path) -> None:
    """A base model (Gemma-3-270m's GGUF has no chat template) is asked its questions as plain
    completions; against itself it agrees exactly. (SmolLM2's weights and tokenizer, its
    template left out.)"""
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (base / name).symlink_to(smollm2_dir / name)
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    result = _run("--model", str(base), "--dtype", "float32", quantization=None, max_tokens=8)
    assert len(QUESTIONS) <= result["num_tokens"] <= len(QUESTIONS) * 8
    assert result["top1_agreement"] == 1.0
    assert result["identical_greedy_answers"] == f"{len(QUESTIONS)}/{len(QUESTIONS)}"


def test_int8_stays_close() -> None:
    result = _run(quantization="int8")
    assert result["quantization"] == "int8"
    # measured on 1,592 tokens: 0.89 agreement, perplexity 4.07 -> 4.30
    assert result["top1_agreement"] >= 0.8
    assert result["perplexity_quantized"] < 1.2 * result["perplexity_reference"]


def test_chunked_perplexity_is_hfs_on_the_same_chunks(smollm2_llm: LLM, hf_smollm2) -> None:
    """llama-perplexity's measure, computed by the engine: each chunk's second half scored
    given the chunk before it; HF's logits on the same chunks give the same number."""
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12)
    tokens = smollm2_llm.get_tokenizer()(text)["input_ids"]
    chunks = _with_bos(smollm2_llm, [tokens[:32], tokens[32:64], tokens[64:96]])
    assert chunks[0] == tokens[:32]  # SmolLM2's vocabulary adds no BOS
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            logprobs = torch.log_softmax(hf_smollm2(torch.tensor([chunk])).logits[0], dim=-1)
            for position in range(16, 31):  # predicting tokens 17..31
                nll -= logprobs[position, chunk[position + 1]].item()
                count += 1
    assert _chunked_perplexity(smollm2_llm, chunks) == pytest.approx(
        math.exp(nll / count), rel=1e-4
    )


@pytest.mark.skipif(
    not _LLAMA_PERPLEXITY.exists(),
    reason=f"llama.cpp's llama-perplexity is not built at {_LLAMA_PERPLEXITY}",
)
def test_llama_perplexity_beside_both_engines() -> None:
    """On SmolLM2's Q4_1 file, the tokens llama.cpp scored: the blocks kept (gguf,
    weight-only) score as the dequantized float32 model does, and llama.cpp's own tool, reading
    the same file with its q8 activations, lands within 3% of them."""
    result = _run("--peer", "llama-perplexity", "--peer-context", "64", quantization="gguf")
    chunked = result["chunked_perplexity"]
    assert chunked["chunks"] >= 2 and result["quantization"] == "gguf"
    assert chunked["quantized"] == pytest.approx(chunked["reference"], rel=1e-3)
    assert chunked["llama-perplexity"] == pytest.approx(chunked["reference"], rel=0.03)
