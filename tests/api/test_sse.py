"""SSE encoding at the edge: a failure after the 200 ends the stream with an error event."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from lmserve.api import sse
from lmserve.api.errors import APIError, error_reply
from lmserve.api.replies import Event, Stream, Whole
from lmserve.api.schemas.common import Usage


async def _failing() -> AsyncIterator[Event]:
    yield Event(Usage.of(1, 1, None))
    raise RuntimeError("the engine died mid-stream")


def _lines(style: str, done_marker: bool) -> list[str]:
    def on_error(exc: Exception) -> Whole:
        reply = error_reply(APIError(str(exc), status=500), style)  # type: ignore[arg-type]
        assert reply is not None
        return reply

    async def collect() -> list[str]:
        stream = Stream(_failing(), done_marker)
        return [line async for line in sse.lines(stream, None, on_error)]

    return asyncio.run(collect())


def test_openai_streams_end_with_an_error_chunk_and_done() -> None:
    lines = _lines("openai", done_marker=True)
    assert len(lines) == 3 and lines[-1] == sse.DONE
    error = json.loads(lines[1].removeprefix("data: "))["error"]
    assert error["message"] == "the engine died mid-stream"
    assert error["type"] == "InternalServerError"


def test_anthropic_streams_end_with_an_error_event() -> None:
    lines = _lines("anthropic", done_marker=False)
    assert len(lines) == 2 and lines[1].startswith("event: error\ndata: ")
    data = json.loads(lines[1].split("data: ", 1)[1])
    assert data == {"type": "error", "error": {"type": "api_error",
                                              "message": "the engine died mid-stream"}}  # fmt: skip
