"""Audio files to 16 kHz mono float32 samples, as Whisper's feature extractor takes them.

WAV, FLAC and OGG decode through libsndfile (`soundfile`); what it cannot read (MP3, M4A,
WebM, ...) through FFmpeg (`av`). Both wheels bundle their codecs. Resampling and downmixing go
through FFmpeg's resampler after the channels are averaged. A file that is not audio, or runs past the duration limit, is an
AudioError that says which.
"""

from __future__ import annotations

import io

import numpy as np

SAMPLE_RATE = 16_000


class AudioError(ValueError):
    """The bytes are not audio lmserve can read, or not within the limits."""


def decode_audio(data: bytes, max_seconds: float | None = None) -> np.ndarray:
    """[samples] float32 at 16 kHz, mono."""
    if not data:
        raise AudioError("the audio file is empty")
    try:
        samples, rate = _with_soundfile(data)
    except AudioError:
        samples, rate = _with_ffmpeg(data)
    if len(samples) == 0:
        raise AudioError("the file holds no audio samples (is it cut short?)")
    if max_seconds is not None and len(samples) / rate > max_seconds:
        raise AudioError(
            f"the audio is {len(samples) / rate:.1f} s long; at most {max_seconds:g} s is accepted"
        )
    return resample(samples, rate)


def _with_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(str(exc)) from None
    return samples, int(rate)


def _with_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
    """Every audio frame of the file's first audio stream, as [samples, channels] float32."""
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pieces = []
            for frame in container.decode(stream):
                pieces += [f.to_ndarray() for f in resampler.resample(frame)]
            pieces += [f.to_ndarray() for f in resampler.resample(None)]
    except av.FFmpegError as exc:
        raise AudioError(
            f"the file is not audio lmserve can read (WAV, FLAC, OGG, MP3, M4A, WebM, ...): {exc}"
        ) from None
    if not pieces:
        raise AudioError("the file holds no audio samples")
    return np.concatenate(pieces, axis=1).T, SAMPLE_RATE


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """[samples] or [samples, channels] at `rate` -> [samples] float32 at 16 kHz: channels
    averaged (as librosa and HF's pipelines downmix), then FFmpeg's resampler."""
    import av

    if samples.ndim == 1:
        samples = samples[:, None]
    if samples.ndim != 2 or not len(samples):
        raise AudioError(f"audio must be [samples] or [samples, channels], got {samples.shape}")
    mono = np.ascontiguousarray(samples.mean(axis=1, dtype=np.float32))
    if rate == SAMPLE_RATE:
        return mono
    frame = av.AudioFrame.from_ndarray(mono[None, :], format="fltp", layout="mono")
    frame.sample_rate = rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    pieces = [f.to_ndarray() for f in resampler.resample(frame)]
    pieces += [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(pieces, axis=1)[0]
