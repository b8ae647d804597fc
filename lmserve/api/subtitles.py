"""Transcript segments as SubRip (.srt) and WebVTT (.vtt) subtitles."""

from __future__ import annotations

from collections.abc import Sequence

from lmserve.api.schemas.transcription import Segment


def _clock(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


def srt(segments: Sequence[Segment]) -> str:
    """Numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(segments, 1)
    )


def vtt(segments: Sequence[Segment]) -> str:
    """The WEBVTT header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    cues = "".join(
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n" for s in segments
    )
    return f"WEBVTT\n\n{cues}"
