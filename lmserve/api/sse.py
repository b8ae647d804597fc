"""Server-sent events, encoded only here at the HTTP edge; serving yields `Event` objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import msgspec

from lmserve.api.replies import Event, Stream, Whole

DONE = "data: [DONE]\n\n"
KEEP_ALIVE = ": keep-alive\n\n"  # an SSE comment: clients skip it, proxies see traffic


def encode(event: Event) -> str:
    data = msgspec.json.encode(event.data).decode()
    if event.name is None:
        return f"data: {data}\n\n"
    return f"event: {event.name}\ndata: {data}\n\n"


async def lines(
    stream: Stream,
    keep_alive_s: float | None = None,
    on_error: Callable[[Exception], Whole] | None = None,
) -> AsyncIterator[str]:
    """The stream as SSE text; with `keep_alive_s`, a comment line whenever no event came for
    that long (a long prefill behind a proxy that drops idle connections). A failure after the
    200 went out ends the stream with `on_error`'s error body as an event (named `error` in
    Anthropic's style) and the usual end, rather than cutting the connection: a client sees
    why, and a stream never ends empty."""
    events = stream.events if keep_alive_s is None else _with_pings(stream.events, keep_alive_s)
    try:
        async for event in events:
            yield KEEP_ALIVE if event is None else encode(event)
    except Exception as exc:
        if on_error is None:
            raise
        error = on_error(exc).body
        tag = error.__struct_config__.tag
        yield encode(Event(error, None if tag is None else str(tag)))
    if stream.done_marker:
        yield DONE


async def _with_pings(
    events: AsyncIterator[Event], interval_s: float
) -> AsyncIterator[Event | None]:
    """The events, with None for each `interval_s` without one."""
    pending = asyncio.ensure_future(anext(events))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            yield event
            pending = asyncio.ensure_future(anext(events))
    finally:
        if not pending.done():
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
