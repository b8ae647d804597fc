"""The speech-to-text endpoints' multipart bodies: OpenAI's /v1/audio/transcriptions and
/v1/audio/translations, with vLLM's sampling extras. Form fields arrive as text; pydantic reads
numbers and booleans from it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]


class AudioRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: bytes = Field(repr=False)
    model: str | None = None
    prompt: str = ""  # text the transcript continues (Whisper's previous-text prompt)
    response_format: ResponseFormat = "json"
    temperature: float = Field(default=0.0, ge=0.0, le=1.0)
    stream: bool = False
    # vLLM's extras
    seed: int | None = None
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class TranscriptionRequest(AudioRequest):
    language: str | None = None  # ISO-639-1, e.g. "en"; None: English (vLLM's default)
    timestamp_granularities: list[Literal["word", "segment"]] = ["segment"]
    include: list[str] | None = None


class TranslationRequest(AudioRequest):
    """Speech in any language to English text: multilingual checkpoints only."""

    language: str | None = None  # the audio's language, when known
