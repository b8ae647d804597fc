"""What serving code answers with: a whole JSON body, or a stream of typed events.

Serving never writes SSE text: the events are encoded once, at the HTTP edge (`api/sse.py`), so
the Messages and Responses converters transform chat's events as data, and a Ray replica hands
its answer to the ingress as these objects.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec


@dataclass(frozen=True, slots=True)
class Event:
    """One server-sent event: a typed payload (`api/schemas/`), with the event name the
    Anthropic and Responses streams give theirs (OpenAI's chat and completion streams name
    none)."""

    data: msgspec.Struct
    name: str | None = None

    @classmethod
    def tagged(cls, data: msgspec.Struct) -> Event:
        """An event named by its payload's tag, as Anthropic's and the Responses API's are."""
        return cls(data, str(data.__struct_config__.tag))


@dataclass(frozen=True, slots=True)
class Whole:
    """A whole answer: a typed body (an error's too), or text of `media_type` (subtitles), its
    status and any extra headers."""

    body: msgspec.Struct | str
    status: int = 200
    headers: dict[str, str] | None = None
    media_type: str = "application/json"


@dataclass(frozen=True, slots=True)
class Stream:
    """A streamed answer. `done_marker`: it ends with `data: [DONE]`, as OpenAI's chat and
    completion streams do (Anthropic's and the Responses API's end with their own events)."""

    events: AsyncIterator[Event]
    done_marker: bool = False


Reply = Whole | Stream
