"""Server-sent events, encoded only here at the HTTP edge; serving yields `Event` objects."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from lmserve.api.replies import Event, Stream

DONE = "data: [DONE]\n\n"


def encode(event: Event) -> str:
    data = json.dumps(event.data, ensure_ascii=False)
    if event.name is None:
        return f"data: {data}\n\n"
    return f"event: {event.name}\ndata: {data}\n\n"


async def lines(stream: Stream) -> AsyncIterator[str]:
    async for event in stream.events:
        yield encode(event)
    if stream.done_marker:
        yield DONE
