"""Log-mel features for Whisper's encoder, computed in the frontend (HF's feature extractor,
read from the model directory), so the engine core receives a fixed [mel bins, frames] window."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmserve.audio.decode import SAMPLE_RATE, AudioError


class WhisperFeatures:
    """One 30 s window of 16 kHz samples -> [mel bins, 3000] float32 (shorter audio is padded
    with silence, as HF's generate pads it)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import WhisperFeatureExtractor

        self._extractor = WhisperFeatureExtractor.from_pretrained(model_dir)
        self.max_seconds = float(self._extractor.chunk_length)

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        seconds = len(samples) / SAMPLE_RATE
        if seconds > self.max_seconds:
            raise AudioError(
                f"the audio is {seconds:.1f} s long; one Whisper request reads at most "
                f"{self.max_seconds:g} s: split it into windows (the transcription endpoint does)"
            )
        if not len(samples):
            raise AudioError("the audio holds no samples")
        features = self._extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")
        return np.ascontiguousarray(features["input_features"][0], dtype=np.float32)
