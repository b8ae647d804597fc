"""POST /v1/audio/transcriptions and /translations on `lmserve serve` with Whisper tiny.en,
through the official openai client: the text equals HF's generate on the same weights, every
response format validates or parses, streams rebuild the text, concurrent files get their solo
results, a client that leaves frees its requests, and every misuse is a 4xx."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import soundfile

from lmserve.audio.decode import SAMPLE_RATE
from tests.api.conftest import Server, start_server, stop_server
from tests.api.test_openai_schema import validate  # noqa: F401 - the fixture
from tests.api.test_server import metric, metrics_once_idle
from tests.models.test_ctranslate2 import BECKETT, word_error_rate
from tests.models.test_whisper import _hf_generate, hf_tokens, windows  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def server(whisper_dir: Path) -> Iterator[Server]:
    server = start_server(
        str(whisper_dir), "--served-model-name", "whisper-tiny.en",
        "--max-audio-file-mb", "5", "--max-audio-duration-s", "300",
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def files(speech_dir: Path) -> dict[str, bytes]:
    return {name: (speech_dir / name).read_bytes() for name in ("beckett.wav", "two_cities.wav")}


@pytest.fixture(scope="module")
def hf_texts(whisper_dir: Path, hf_tokens: list[list[int]]) -> dict[str, str]:  # noqa: F811
    """HF's transcripts: beckett whole, two_cities's two windows joined."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(whisper_dir)
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in hf_tokens]
    return {"beckett.wav": texts[0], "two_cities.wav": " ".join(texts[1:])}


def _encoded(samples: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, SAMPLE_RATE, format=fmt)
    return out.getvalue()


def test_json_text_equals_hf(client, files, hf_texts, server) -> None:
    for name, data in files.items():
        answer = client.audio.transcriptions.create(
            file=(name, data), model="whisper-tiny.en", temperature=0.0, language="en"
        )
        assert answer.text == hf_texts[name]
    assert word_error_rate(BECKETT, hf_texts["beckett.wav"]) <= 0.10
    raw = httpx.post(f"{server.url}/v1/audio/transcriptions",
                     files={"file": ("b.wav", files["beckett.wav"])}, timeout=120).json()  # fmt: skip
    assert raw == {"text": hf_texts["beckett.wav"], "usage": {"type": "duration", "seconds": 10}}


def test_every_response_format(client, files, windows, whisper_dir, server) -> None:  # noqa: F811
    """verbose_json, srt and vtt decode with timestamps: each window's segments carry exactly
    HF's generate(return_timestamps=True) tokens, timed from the window's start."""
    import srt
    import webvtt

    verbose = httpx.post(f"{server.url}/v1/audio/transcriptions",
                         files={"file": ("c.wav", files["two_cities.wav"])},
                         data={"response_format": "verbose_json"}, timeout=120).json()  # fmt: skip
    segments = verbose["segments"]
    assert verbose["language"] == "english" and verbose["duration"] == 44.374
    stamped = _hf_generate(whisper_dir, windows[1:], return_timestamps=True)
    cut = 24.55  # where two_cities's first window ends
    assert [t for s in segments if s["start"] < cut for t in s["tokens"]] == stamped[0]
    assert [t for s in segments if s["start"] >= cut for t in s["tokens"]] == stamped[1]
    assert [s["id"] for s in segments] == list(range(len(segments))) and len(segments) > 4
    bounds = [x for s in segments for x in (s["start"], s["end"])]
    assert bounds == sorted(bounds) and bounds[0] < 1 and bounds[-1] <= verbose["duration"]
    assert all(s["avg_logprob"] < 0 and s["compression_ratio"] > 0 for s in segments)
    # a window's no-speech probability, on each of its segments
    per_window = {s["start"] >= cut: s["no_speech_prob"] for s in segments}
    assert all(s["no_speech_prob"] == per_window[s["start"] >= cut] for s in segments)
    assert all(0 < p < 0.5 for p in per_window.values())
    assert verbose["text"] == " ".join(s["text"].strip() for s in segments)
    assert word_error_rate(hf_text := " ".join(s["text"] for s in segments), verbose["text"]) == 0
    assert "best of times" in hf_text and "superlative degree" in hf_text

    def ask(fmt: str) -> str:
        return client.audio.transcriptions.create(
            file=("c.wav", files["two_cities.wav"]), model="whisper-tiny.en", response_format=fmt
        )

    subs = list(srt.parse(ask("srt")))
    assert [s.index for s in subs] == list(range(1, len(segments) + 1))
    assert [(s.start.total_seconds(), s.end.total_seconds()) for s in subs] == [
        (seg["start"], seg["end"]) for seg in segments
    ]
    assert [s.content for s in subs] == [seg["text"].strip() for seg in segments]
    cues = webvtt.from_buffer(io.StringIO(ask("vtt")))
    assert [c.text for c in cues] == [seg["text"].strip() for seg in segments]
    assert [c.start_in_seconds for c in cues] == [int(seg["start"]) for seg in segments]


def test_plain_text_format(client, files, hf_texts) -> None:
    answer = client.audio.transcriptions.create(
        file=("c.wav", files["two_cities.wav"]), model="whisper-tiny.en", response_format="text"
    )
    assert answer.strip() == hf_texts["two_cities.wav"]


def test_stream_rebuilds_the_text(client, files, hf_texts) -> None:
    stream = client.audio.transcriptions.create(
        file=("c.wav", files["two_cities.wav"]), model="whisper-tiny.en", stream=True
    )
    events = [e.model_dump(exclude_none=True) for e in stream]
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 20 and all(e["type"] == "transcript.text.delta" for e in deltas)
    assert done["type"] == "transcript.text.done"
    assert "".join(e["delta"] for e in deltas) == done["text"] == hf_texts["two_cities.wav"]


def test_answers_validate_against_openais_spec(server: Server, files, validate) -> None:  # noqa: F811
    url, upload = (
        f"{server.url}/v1/audio/transcriptions",
        {"file": ("c.wav", files["two_cities.wav"])},
    )
    plain = httpx.post(url, files=upload, timeout=120).json()
    validate("CreateTranscriptionResponseJson", plain)
    verbose = httpx.post(url, files=upload, data={"response_format": "verbose_json"}, timeout=120)
    validate("CreateTranscriptionResponseVerboseJson", verbose.json())
    with httpx.stream("POST", url, files=upload, data={"stream": "true"}, timeout=120) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for event in events[:-1]:
        validate("TranscriptTextDeltaEvent", event)
    validate("TranscriptTextDoneEvent", events[-1])


def test_four_files_at_once_get_their_solo_results(client, files, windows, server) -> None:  # noqa: F811
    uploads = [
        ("b.wav", files["beckett.wav"]),
        ("c.wav", files["two_cities.wav"]),
        ("b.mp3", _encoded(windows[0], "MP3")),
        ("w2.flac", _encoded(windows[2], "FLAC")),
    ]
    solo = [
        client.audio.transcriptions.create(file=u, model="whisper-tiny.en").text for u in uploads
    ]

    async def together() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        answers = await asyncio.gather(*(
            aclient.audio.transcriptions.create(file=u, model="whisper-tiny.en") for u in uploads
        ))  # fmt: skip
        return [a.text for a in answers]

    assert asyncio.run(together()) == solo
    assert all(solo) and solo[2].startswith("Ever tried")


def test_a_client_that_leaves_frees_its_requests(server: Server, files, speech_dir) -> None:
    """Three minutes of speech (seven windows, all decoding at once): a stream closed after
    its first delta, and a whole answer given up on, abort every window's request."""
    samples, rate = soundfile.read(speech_dir / "two_cities.wav", dtype="float32")
    long = _encoded(np.tile(samples[::3], 4), "FLAC")  # 48 kHz taken as 16 kHz, 177 s

    def generated() -> float:
        return metric(metrics_once_idle(server), "lmserve:generation_tokens_total")

    before = generated()
    full = httpx.post(f"{server.url}/v1/audio/transcriptions",
                      files={"file": ("long.flac", long)}, timeout=120)  # fmt: skip
    assert full.status_code == 200, full.text
    per_run = generated() - before
    with httpx.stream("POST", f"{server.url}/v1/audio/transcriptions",
                      files={"file": ("long.flac", long)}, data={"stream": "true"},
                      timeout=120) as response:  # fmt: skip
        assert next(response.iter_lines()).startswith("data: ")
    after_stream = generated()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/audio/transcriptions",
                   files={"file": ("long.flac", long)}, timeout=0.5)  # fmt: skip
    text = metrics_once_idle(server)
    assert after_stream - before - per_run < per_run / 2
    assert metric(text, "lmserve:generation_tokens_total") - after_stream < per_run / 2
    assert metric(text, "lmserve:kv_cache_usage_perc") == 0
    assert metric(text, "lmserve:num_requests_running") == 0


def _error(server: Server, path: str, files: dict, data: dict | None = None) -> httpx.Response:
    response = httpx.post(f"{server.url}{path}", files=files, data=data or {}, timeout=60)
    assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    return response


def test_misuse_is_a_4xx_that_says_why(server: Server, files) -> None:
    beckett = {"file": ("b.wav", files["beckett.wav"])}
    path = "/v1/audio/transcriptions"
    bad = _error(server, path, {"file": ("x.wav", b"RIFF" + b"\x00" * 4000)})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "file"
    assert "not audio" in bad.json()["error"]["message"]
    empty = _error(server, path, {"file": ("x.wav", b"")})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    big = _error(server, path, {"file": ("x.wav", b"\x00" * (6 * 2**20))})
    assert big.status_code == 413 and "--max-audio-file-mb" in big.json()["error"]["message"]
    silence = _encoded(np.zeros(301 * SAMPLE_RATE, dtype=np.float32), "FLAC")
    long = _error(server, path, {"file": ("x.flac", silence)})
    assert long.status_code == 400 and "at most 300 s" in long.json()["error"]["message"]
    german = _error(server, path, beckett, {"language": "de"})
    assert german.status_code == 400 and german.json()["error"]["param"] == "language"
    translated = _error(server, "/v1/audio/translations", beckett)
    assert translated.status_code == 400 and "English-only" in translated.json()["error"]["message"]
    hot = _error(server, path, beckett, {"temperature": "3"})
    assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature"
    words = _error(server, path, beckett, {"timestamp_granularities[]": "word"})
    assert words.status_code == 400 and words.json()["error"]["param"] == "timestamp_granularities"
    fmt = _error(server, path, beckett, {"response_format": "docx"})
    assert fmt.status_code == 400 and fmt.json()["error"]["param"] == "response_format"
    missing = _error(server, path, {"model": (None, "whisper-tiny.en")})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    as_json = httpx.post(f"{server.url}{path}", json={"file": "x"}, timeout=60)
    assert (
        as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    )
    unknown = _error(server, path, beckett, {"model": "whisper-large"})
    assert unknown.status_code == 404
    chat = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Ever tried"}, timeout=60)
    assert chat.status_code == 400 and "speech model" in chat.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.fixture(scope="module")
def multilingual_server(multilingual_whisper_dir: Path) -> Iterator[Server]:
    server = start_server(str(multilingual_whisper_dir), "--served-model-name", "whisper-ml")
    yield server
    stop_server(server)


def test_multilingual_translation_and_languages(
    multilingual_server: Server,
    multilingual_whisper_dir: Path,
    files,
    windows,  # noqa: F811
) -> None:
    """A multilingual checkpoint (tiny, random) translates, and transcribes in the language
    asked for, with HF's tokens for the same task and language; an unknown language is a 400."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(multilingual_whisper_dir)
    upload = {"file": ("b.wav", files["beckett.wav"])}
    url = multilingual_server.url
    for path, task, language in [("translations", "translate", "de"),
                                 ("transcriptions", "transcribe", "fr")]:  # fmt: skip
        expected = _hf_generate(multilingual_whisper_dir, windows[:1], language=language, task=task)
        answer = httpx.post(f"{url}/v1/audio/{path}", files=upload,
                            data={"language": language}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
        text = tokenizer.decode(expected[0], skip_special_tokens=True).strip()
        assert answer.json()["text"] == text
    verbose = httpx.post(f"{url}/v1/audio/transcriptions", files=upload,
                         data={"language": "de", "response_format": "verbose_json"},
                         timeout=120).json()  # fmt: skip
    assert verbose["language"] == "german"
    unknown = _error(multilingual_server, "/v1/audio/transcriptions", upload, {"language": "xx"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "language"


def test_sampled_transcripts_hold_no_timestamp_tokens(client: openai.OpenAI, files) -> None:
    """At temperature 1 a plain transcript may sample timestamp tokens (no rules apply without
    timestamps, as in HF); their text is dropped, as HF's Whisper decode drops it."""
    texts = [
        client.audio.transcriptions.create(
            file=("c.wav", files["two_cities.wav"]), model="whisper-tiny.en", temperature=1.0,
            extra_body={"seed": seed},
        ).text
        for seed in range(4, 8)  # seeds whose first window samples timestamp tokens
    ]  # fmt: skip
    assert len(set(texts)) > 1 and all(t and "<|" not in t for t in texts)
