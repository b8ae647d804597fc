"""POST /v1/audio/transcriptions and /v1/audio/translations: multipart uploads to a Whisper
model."""

from __future__ import annotations

from lmserve.api.endpoints.base import Endpoint, Servings
from lmserve.api.replies import Reply
from lmserve.api.transcription_protocol import TranscriptionRequest, TranslationRequest


async def create_transcription(servings: Servings, request: TranscriptionRequest) -> Reply:
    return await servings.transcription.transcribe(request, "transcribe")


async def create_translation(servings: Servings, request: TranslationRequest) -> Reply:
    return await servings.transcription.transcribe(request, "translate")


ENDPOINTS = (
    Endpoint(
        "transcriptions",
        "/v1/audio/transcriptions",
        TranscriptionRequest,
        create_transcription,
        form=True,
    ),
    Endpoint(
        "translations", "/v1/audio/translations", TranslationRequest, create_translation, form=True
    ),
)
