"""The speech-to-text replies, as OpenAI's spec shapes them: json, verbose_json with segments,
and the `transcript.text.delta` / `transcript.text.done` stream events."""

from __future__ import annotations

from typing import Literal

import msgspec


class DurationUsage(msgspec.Struct, kw_only=True):
    type: Literal["duration"] = "duration"
    seconds: int  # the audio's length, rounded up


class TranscriptionJson(msgspec.Struct, kw_only=True):
    text: str
    usage: DurationUsage


class Segment(msgspec.Struct, kw_only=True):
    id: int
    seek: int  # the window's first 10 ms mel frame
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionVerbose(msgspec.Struct, kw_only=True):
    task: Literal["transcribe", "translate"]
    language: str
    duration: float
    text: str
    segments: list[Segment]
    usage: DurationUsage


class TextDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="transcript.text.delta"):
    delta: str


class TextDone(msgspec.Struct, kw_only=True, tag_field="type", tag="transcript.text.done"):
    text: str
