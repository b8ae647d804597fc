"""Audio longer than Whisper's 30 s window, cut into windows at its quietest moments.

Whisper reads 30 s at a time. Cutting blindly at 30 s splits a word between two windows and
both transcribe it badly; so each cut goes at the quietest 100 ms (lowest RMS) of the last
`search_s` seconds before the window's end, and a window shorter than that search never cuts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmserve.audio.decode import SAMPLE_RATE

WINDOW_S = 30.0
_FRAME = SAMPLE_RATE // 10  # 100 ms


@dataclass(frozen=True)
class Window:
    start: int  # first sample, in the whole file
    samples: np.ndarray

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return (self.start + len(self.samples)) / SAMPLE_RATE


def split_windows(
    samples: np.ndarray, window_s: float = WINDOW_S, search_s: float = 10.0
) -> list[Window]:
    """Consecutive windows of at most `window_s` covering every sample once."""
    window = int(window_s * SAMPLE_RATE)
    search = min(int(search_s * SAMPLE_RATE), window // 2)
    windows = []
    start = 0
    while len(samples) - start > window:
        end = start + window
        cut = _quietest(samples[end - search : end]) + end - search
        windows.append(Window(start, samples[start:cut]))
        start = cut
    windows.append(Window(start, samples[start:]))
    return windows


def _quietest(span: np.ndarray) -> int:
    """The middle of the quietest 100 ms frame in `span` (later frames win ties)."""
    frames = len(span) // _FRAME
    energy = np.square(span[: frames * _FRAME].reshape(frames, _FRAME)).mean(axis=1)
    best = frames - 1 - int(np.argmin(energy[::-1]))
    return best * _FRAME + _FRAME // 2
