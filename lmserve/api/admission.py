"""Overload answers instead of queues: with --max-num-queued-reqs, a generating request that
would wait behind that many others gets a 503 with Retry-After before any work is done for it
(no templating, no tokenizing), so a burst costs the server almost nothing to turn away."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from lmserve.api.errors import APIError
from lmserve.api.replies import Event, Reply, Stream

RETRY_AFTER_S = 1


class Admission:
    """The one count of a server's generating requests in flight (admitted, not yet answered
    in full); the engine runs `max_num_seqs` of them, the rest wait."""

    def __init__(self, max_num_seqs: int, max_num_queued_reqs: int | None) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_queued_reqs = max_num_queued_reqs
        self.num_in_flight = 0

    def admit(self) -> Ticket:
        """A ticket for one more request; a 503 when it would queue past the limit."""
        if self.max_num_queued_reqs is not None:
            num_queued = self.num_in_flight - self.max_num_seqs
            if num_queued >= self.max_num_queued_reqs:
                raise APIError(
                    f"The server is overloaded: {num_queued} requests are waiting "
                    f"(--max-num-queued-reqs {self.max_num_queued_reqs}); retry later",
                    status=503,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
        self.num_in_flight += 1
        return Ticket(self)


class Ticket:
    """One admitted request's place; given back once, however its answer ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.num_in_flight -= 1
            self._admission = None

    def hold_until_done(self, reply: Reply) -> Reply:
        """A whole reply is done; a stream holds the ticket until it ends, is closed, or is
        dropped without ever being read (a client gone before the first byte)."""
        if not isinstance(reply, Stream):
            self.release()
            return reply
        events = _released_at_end(reply.events, self)
        weakref.finalize(events, self.release)
        return Stream(events, reply.done_marker)


async def _released_at_end(events: AsyncIterator[Event], ticket: Ticket) -> AsyncIterator[Event]:
    try:
        async for event in events:
            yield event
    finally:
        ticket.release()
