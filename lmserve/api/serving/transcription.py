"""Speech to text on a Whisper model: /v1/audio/transcriptions and /v1/audio/translations.

The file is decoded to 16 kHz mono (bounded in bytes and seconds), cut into 30 s windows at its
quietest moments, and every window is one engine request, all in flight at once; their texts
are joined in order. verbose_json, srt and vtt decode with Whisper's timestamp tokens, whose
pairs bound the segments (offset by their window's start). A stream sends each window's text as
it is decoded, in order.
"""

from __future__ import annotations

import asyncio
import math
import re
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from lmserve.api.errors import APIError
from lmserve.api.replies import Event, Reply, Stream, Whole
from lmserve.api.schemas.transcription import (
    DurationUsage,
    Segment,
    TextDelta,
    TextDone,
    TranscriptionJson,
    TranscriptionVerbose,
)
from lmserve.api.serving import common
from lmserve.api.subtitles import srt, vtt
from lmserve.api.transcription_protocol import AudioRequest
from lmserve.audio.decode import SAMPLE_RATE, AudioError, decode_audio
from lmserve.audio.windows import Window, split_windows
from lmserve.engine.protocol import EngineClient
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams

Task = Literal["transcribe", "translate"]
_TIMESTAMP = re.compile(r"<\|\d+\.\d+\|>")
_SECONDS_PER_STAMP = 0.02  # Whisper's timestamp tokens: <|0.00|>, <|0.02|>, ... <|30.00|>
_TEXT_FORMATS = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


@dataclass(frozen=True)
class _Job:
    """One request's windows, each with its decoder prompt, and how to sample them."""

    model: str
    task: Task
    language: str  # the language's name, as verbose_json reports it
    duration: float
    windows: list[Window]
    prompt: list[int]  # every window's: windows decode at once, none waits for another's text
    params: SamplingParams
    tokens: _WhisperTokens


class TranscriptionServing:
    def __init__(self, engine: EngineClient, config: common.ServingConfig) -> None:
        self.engine = engine
        self.config = config

    async def transcribe(self, request: AudioRequest, task: Task) -> Reply:
        job = await self._job(request, task)
        ids = [f"{task}-{uuid.uuid4().hex}-{i}" for i in range(len(job.windows))]
        if request.stream:
            return Stream(self._stream(job, ids))
        outputs = await self._finals(job, ids)
        text = " ".join(_plain(o.outputs[0].text).strip() for o in outputs).strip()
        usage = DurationUsage(seconds=math.ceil(job.duration))
        if request.response_format == "json":
            return Whole(TranscriptionJson(text=text, usage=usage))
        if request.response_format == "text":
            return Whole(text, media_type=_TEXT_FORMATS["text"])
        segments = [
            segment
            for window, output in zip(job.windows, outputs, strict=True)
            for segment in _segments(window, output, job)
        ]
        segments = [msgspec.structs.replace(s, id=i) for i, s in enumerate(segments)]
        text = " ".join(s.text.strip() for s in segments)
        if request.response_format == "verbose_json":
            return Whole(
                TranscriptionVerbose(
                    task=task,
                    language=job.language,
                    duration=job.duration,
                    text=text,
                    segments=segments,
                    usage=usage,
                )
            )
        subtitles = srt(segments) if request.response_format == "srt" else vtt(segments)
        return Whole(subtitles, media_type=_TEXT_FORMATS[request.response_format])

    async def _job(self, request: AudioRequest, task: Task) -> _Job:
        """Everything checked before any work is queued: the model, the file, the language.
        The file is decoded off the event loop (a long MP3 takes a while)."""
        model, lora = common.check_model(self.config, request.model)
        if lora is not None:
            raise APIError("speech models take no LoRA adapters", param="model")
        endpoint = "/v1/audio/translations" if task == "translate" else "/v1/audio/transcriptions"
        if not self.engine.config.model.num_encoder_tokens or self.engine.tokenizer is None:
            raise APIError(
                f"The model `{model}` is not a speech-to-text model and does not serve "
                f"{endpoint}: serve a Whisper checkpoint",
                param="model",
            )
        limit_mb = self.config.max_audio_file_mb
        if len(request.file) > limit_mb * 2**20:
            raise APIError(
                f"The audio file is {len(request.file) / 2**20:.1f} MB, over the "
                f"{limit_mb:g} MB limit (--max-audio-file-mb)",
                status=413,
                param="file",
            )
        try:
            samples = await asyncio.to_thread(
                decode_audio, request.file, self.config.max_audio_duration_s
            )
        except AudioError as exc:
            raise APIError(f"file: {exc}", param="file") from None
        if "word" in getattr(request, "timestamp_granularities", ()):
            raise APIError(
                "timestamp_granularities `word` is not supported yet: ask for `segment`",
                param="timestamp_granularities",
            )
        tokens = _WhisperTokens(self.engine.tokenizer, self.engine.config.model.hf_config)
        language = tokens.language(getattr(request, "language", None), task)
        windows = split_windows(samples)
        timed = request.response_format in ("verbose_json", "srt", "vtt")
        prompt = tokens.prompt(request.prompt, language, task, timestamps=timed)
        max_len = self.engine.config.scheduler.max_model_len
        params = self._params(request, max_len - len(prompt))
        return _Job(
            model, task, tokens.language_name(language), round(len(samples) / SAMPLE_RATE, 3),
            windows, prompt, params, tokens,
        )  # fmt: skip

    def _params(self, request: AudioRequest, room: int) -> SamplingParams:
        if room < 1:
            raise APIError("the prompt leaves no room for a transcript: shorten it", param="prompt")
        defaults = self.config.sampling_defaults
        max_tokens = min(request.max_completion_tokens or room, room)
        try:
            return SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p if request.top_p is not None else defaults.get("top_p", 1.0),
                top_k=request.top_k if request.top_k is not None else defaults.get("top_k", 0),
                min_p=request.min_p if request.min_p is not None else 0.0,
                repetition_penalty=request.repetition_penalty or 1.0,
                seed=request.seed,
                max_tokens=max_tokens,
                logprobs=0 if request.response_format == "verbose_json" else None,
            )
        except ValueError as exc:
            raise APIError(str(exc)) from None

    def _generate(self, job: _Job, i: int, request_id: str) -> AsyncIterator[RequestOutput]:
        window = job.windows[i]
        prompt: dict[str, Any] = {
            "prompt_token_ids": job.prompt,
            "multi_modal_data": {"audio": (window.samples, SAMPLE_RATE)},
        }
        return self.engine.generate(prompt, job.params, request_id)

    async def _finals(self, job: _Job, ids: list[str]) -> list[RequestOutput]:
        """Every window's finished output; one failing cancels (and aborts) the others."""

        async def last(i: int) -> RequestOutput:
            final = None
            async for final in self._generate(job, i, ids[i]):  # noqa: B007 - the last one
                pass
            assert final is not None
            return final

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(last(i)) for i in range(len(job.windows))]
        return [t.result() for t in tasks]

    async def _stream(self, job: _Job, ids: list[str]) -> AsyncIterator[Event]:
        """Text deltas in window order while every window decodes at once; a client that
        leaves cancels them all."""
        queues: list[asyncio.Queue[str | None]] = [asyncio.Queue() for _ in job.windows]

        async def feed(i: int) -> None:
            sent = 0
            async for output in self._generate(job, i, ids[i]):
                text = _plain(output.outputs[0].text).lstrip()  # windows join with one space
                text = f" {text}" if i and text else text
                if len(text) > sent:
                    queues[i].put_nowait(text[sent:])
                    sent = len(text)
            queues[i].put_nowait(None)

        tasks = [asyncio.ensure_future(feed(i)) for i in range(len(job.windows))]
        parts: list[str] = []
        try:
            for i, queue in enumerate(queues):
                while (delta := await _next(queue, tasks[i])) is not None:
                    parts.append(delta)
                    yield Event(TextDelta(delta=delta))
            yield Event(TextDone(text="".join(parts).strip()))
        finally:
            for task in tasks:
                task.cancel()


def _plain(text: str) -> str:
    """Text without timestamp tokens, which a sampled plain transcript can hold (Whisper's
    rules apply only with timestamps on), as HF's Whisper decode drops them."""
    return _TIMESTAMP.sub("", text)


async def _next(queue: asyncio.Queue[str | None], task: asyncio.Future[None]) -> str | None:
    """The queue's next item, or the feeding task's exception if it failed first."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    task.result()  # raises what failed the window
    return await queue.get()


def _segments(window: Window, output: RequestOutput, job: _Job) -> list[Segment]:
    """The window's segments from its timestamp tokens: `<|t0|> text <|t1|>` each, times
    offset by the window's start; text left open at the end runs to the window's end. Each
    carries its window's no-speech probability, as Whisper reports it."""
    completion = output.outputs[0]
    begin, eos = job.tokens.timestamp_begin, job.tokens.eos
    segments: list[Segment] = []
    start: int | None = None  # index of the open segment's first token
    for i, token in enumerate(completion.token_ids):
        if token < begin:
            continue
        if start is None:
            start = i
        elif i > start + 1:  # text since the opening timestamp: this one closes it
            segments.append(_segment(window, completion, start, i + 1, output.no_speech_prob, job))
            start = None
        else:
            start = i  # two timestamps with no text between: the second opens
    end = len(completion.token_ids) - (completion.token_ids[-1:] == [eos])
    if start is not None and end > start + 1:
        segments.append(_segment(window, completion, start, end, output.no_speech_prob, job))
    return segments


def _segment(
    window: Window,
    completion: CompletionOutput,
    start: int,
    end: int,
    no_speech_prob: float | None,
    job: _Job,
) -> Segment:
    """The segment of tokens [start, end): its opening timestamp, text, and closing timestamp
    (the window's end where it has none)."""
    tokens = completion.token_ids[start:end]
    logprobs = (completion.logprobs or [])[start:end]
    begin = job.tokens.timestamp_begin
    text = job.tokens.tokenizer.decode([t for t in tokens if t < begin], skip_special_tokens=True)
    opened = window.start_s + (tokens[0] - begin) * _SECONDS_PER_STAMP
    closed = window.start_s + (tokens[-1] - begin) * _SECONDS_PER_STAMP
    if tokens[-1] < begin:
        closed = window.end_s
    chosen = [lp[t].logprob for t, lp in zip(tokens, logprobs, strict=False) if t in lp]
    encoded = text.encode()
    return Segment(
        id=0,
        seek=window.start * 100 // SAMPLE_RATE,
        start=round(opened, 3),
        end=round(min(closed, window.end_s), 3),
        text=text,
        tokens=tokens,
        temperature=job.params.temperature,
        avg_logprob=sum(chosen) / max(len(chosen), 1),
        compression_ratio=len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0,
        no_speech_prob=no_speech_prob if no_speech_prob is not None else 0.0,
    )


class _WhisperTokens:
    """Whisper's special tokens: the decoder prompt for a task and language, as HF's generate
    builds it (previous text, start of transcript, language, task, no timestamps)."""

    def __init__(self, tokenizer: Any, hf_config: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.multilingual = int(hf_config["vocab_size"]) >= 51865
        self.max_prompt = int(hf_config.get("max_target_positions", 448)) // 2 - 1
        self.eos = int(hf_config["eos_token_id"])
        self.timestamp_begin = self._id("<|notimestamps|>") + 1  # <|0.00|>

    def _id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def language(self, code: str | None, task: Task) -> str:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        if not self.multilingual:
            if task == "translate":
                raise APIError(
                    "This model is English-only: it transcribes English and cannot translate; "
                    "serve a multilingual Whisper checkpoint for /v1/audio/translations",
                    param="model",
                )
            if code not in (None, "en"):
                raise APIError(
                    f"This model is English-only: language must be `en`, got `{code}`",
                    param="language",
                )
            return "en"
        code = code or "en"
        if code not in LANGUAGES or self._id(f"<|{code}|>") == self.tokenizer.unk_token_id:
            raise APIError(
                f"Unknown language `{code}`: send an ISO-639-1 code Whisper knows, such as `en`, "
                "`de` or `ja`",
                param="language",
            )
        return code

    def language_name(self, code: str) -> str:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        return LANGUAGES[code]

    def prompt(self, text: str, language: str, task: Task, timestamps: bool) -> list[int]:
        ids = []
        if text.strip():
            previous = self.tokenizer.encode(" " + text.strip(), add_special_tokens=False)
            ids = [self._id("<|startofprev|>"), *previous[-self.max_prompt :]]
        ids.append(self._id("<|startoftranscript|>"))
        if self.multilingual:
            ids += [self._id(f"<|{language}|>"), self._id(f"<|{task}|>")]
        if not timestamps:
            ids.append(self._id("<|notimestamps|>"))
        return ids
