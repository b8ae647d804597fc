"""Whisper's encoder against HF's, on the converted tiny.en and real speech, and on a tiny
random config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmserve.models.whisper_encoder import WhisperEncoder


def _ours(path: Path) -> WhisperEncoder:
    encoder = WhisperEncoder(json.loads((path / "config.json").read_text()))
    tensors = load_file(path / "model.safetensors")
    wanted = {n: t.float() for n, t in tensors.items() if n.startswith("model.encoder.")}
    assert encoder.load_weights(wanted.items()) == {n for n, _ in encoder.named_parameters()}
    return encoder.eval()


def test_tiny_en_on_real_speech_equals_hf(whisper_dir: Path, speech_dir: Path) -> None:
    import soundfile
    from transformers import AutoProcessor, WhisperModel

    processor = AutoProcessor.from_pretrained(whisper_dir)
    audio, rate = soundfile.read(speech_dir / "beckett.wav", dtype="float32")
    features = processor(audio, sampling_rate=rate, return_tensors="pt").input_features
    hf = WhisperModel.from_pretrained(whisper_dir, dtype=torch.float32).eval().encoder
    with torch.no_grad():
        expected = hf(features).last_hidden_state
        got = _ours(whisper_dir)(features)
    assert got.shape == (1, 1500, 384)
    assert (got - expected).abs().max().item() < 1e-4


def test_tiny_random_batch_equals_hf(tmp_path: Path) -> None:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4,
                              encoder_ffn_dim=128, decoder_layers=1, decoder_attention_heads=4,
                              decoder_ffn_dim=128, num_mel_bins=80, max_source_positions=50,
                              vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              decoder_start_token_id=1, begin_suppress_tokens=None)  # fmt: skip
    tf.WhisperForConditionalGeneration(config).save_pretrained(tmp_path)
    hf = tf.WhisperModel.from_pretrained(tmp_path, dtype=torch.float32).eval().encoder
    features = torch.randn(3, 80, 100)
    with torch.no_grad():
        expected = hf(features).last_hidden_state
        got = _ours(tmp_path)(features)
    assert (got - expected).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="windows of 100 mel frames"):
        _ours(tmp_path)(torch.randn(1, 80, 99))
