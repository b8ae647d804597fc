"""Audio files to 16 kHz mono: WAV at 16 and 48 kHz, FLAC and OGG through libsndfile, MP3
through FFmpeg, stereo downmixed; what is not audio, or too long, is an AudioError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile

from lmserve.audio.decode import AudioError, decode_audio


def _encoded(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt)
    return out.getvalue()


def test_real_wavs(speech_dir: Path) -> None:
    beckett = decode_audio((speech_dir / "beckett.wav").read_bytes())
    original, rate = soundfile.read(speech_dir / "beckett.wav", dtype="float32")
    assert rate == 16_000 and beckett.dtype == np.float32
    np.testing.assert_array_equal(beckett, original)  # 16 kHz mono: untouched
    cities = decode_audio((speech_dir / "two_cities.wav").read_bytes())  # 48 kHz
    seconds = soundfile.info(speech_dir / "two_cities.wav").duration
    assert abs(len(cities) / 16_000 - seconds) < 0.01


def _tone(rate: int, seconds: float = 1.0, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_formats_resample_and_downmix(fmt: str) -> None:
    left = _tone(44_100)
    stereo = np.stack([left, left], axis=1)
    got = decode_audio(_encoded(stereo, 44_100, fmt))
    assert abs(len(got) - 16_000) < 1_200  # MP3 frames pad the ends a little
    expected = _tone(16_000)
    # the same 440 Hz tone, at the new rate (compared away from the resampler's edges)
    spectrum = np.abs(np.fft.rfft(got[2_000:14_000]))
    assert abs(np.argmax(spectrum) * 16_000 / 12_000 - 440) < 5
    assert abs(np.sqrt(np.mean(got[2_000:14_000] ** 2)) - np.sqrt(np.mean(expected**2))) < 0.05


def test_what_is_refused() -> None:
    with pytest.raises(AudioError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioError, match="not audio"):
        decode_audio(b"this is plain text, not a sound")
    wav = _encoded(_tone(16_000, seconds=3.0), 16_000, "WAV")
    with pytest.raises(AudioError, match="at most 2 s"):
        decode_audio(wav, max_seconds=2)
    with pytest.raises(AudioError):
        decode_audio(wav[:40] + b"\x00" * 10)  # a truncated header
