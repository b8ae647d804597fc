"""Long audio cut into Whisper windows at quiet moments, covering every sample once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmserve.audio.decode import SAMPLE_RATE, decode_audio
from lmserve.audio.windows import split_windows


def test_short_audio_is_one_window() -> None:
    samples = np.ones(SAMPLE_RATE * 12, dtype=np.float32)
    (window,) = split_windows(samples)
    assert window.start == 0 and len(window.samples) == len(samples)


def test_cuts_fall_in_silence() -> None:
    rng = np.random.default_rng(0)
    samples = rng.normal(0, 0.3, SAMPLE_RATE * 70).astype(np.float32)  # "speech" throughout
    quiet = [int(24.3 * SAMPLE_RATE), int(51.0 * SAMPLE_RATE)]
    for at in quiet:
        samples[at : at + SAMPLE_RATE // 2] = 0.0  # half a second of silence
    windows = split_windows(samples)
    assert len(windows) == 3
    assert np.array_equal(np.concatenate([w.samples for w in windows]), samples)
    assert all(len(w.samples) <= 30 * SAMPLE_RATE for w in windows)
    for window, at in zip(windows[1:], quiet, strict=True):  # each cut inside its silence
        assert at <= window.start < at + SAMPLE_RATE // 2
        assert window.start_s == window.start / SAMPLE_RATE


def test_real_speech_windows_are_monotonic(speech_dir: Path) -> None:
    samples = decode_audio((speech_dir / "two_cities.wav").read_bytes())  # 44 s
    windows = split_windows(samples)
    assert len(windows) == 2
    assert windows[0].start_s == 0 and 20 <= windows[1].start_s <= 30
    assert windows[0].end_s == windows[1].start_s
    assert abs(windows[-1].end_s - len(samples) / SAMPLE_RATE) < 1e-9
    cut = windows[1].start  # a pause: far quieter than the speech around it
    pause = np.sqrt(np.mean(samples[cut - 800 : cut + 800] ** 2))
    assert pause < 0.2 * np.sqrt(np.mean(samples**2))
