"""Overload answers instead of queues, with vLLM's two limits: `--max-num-queued-reqs` bounds the
sequences in flight (running and waiting), `--max-num-queued-tokens` the prompt tokens waiting
for prefill. Past either, a generating request gets a 503 with Retry-After before any work is
done for it (no templating, no tokenizing), so a burst costs the server almost nothing to turn
away."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import Any

from lmserve.api.errors import APIError
from lmserve.api.replies import Event, Reply, Stream
from lmserve.engine.protocol import EngineClient

RETRY_AFTER_S = 1


class Admission:
    """The one count of a server's generating sequences in flight (admitted, not yet answered
    in full). The prefill backlog is the engine's own count."""

    def __init__(
        self,
        engine: EngineClient,
        max_num_queued_reqs: int | None,
        max_num_queued_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_num_queued_reqs = max_num_queued_reqs
        self.max_num_queued_tokens = max_num_queued_tokens
        self.num_in_flight = 0

    def admit(self, body: Any) -> Ticket:
        """A ticket for the request with this (unparsed) body; a 503 past either limit."""
        num_seqs, param = _num_seqs(body)
        limit = self.max_num_queued_reqs
        if limit is not None:
            if num_seqs > limit:
                raise APIError(
                    f"The request asks for {num_seqs} sequences, more than this server ever runs "
                    f"at once (--max-num-queued-reqs {limit})",
                    param=param,
                )
            if self.num_in_flight + num_seqs > limit:
                raise overloaded(
                    f"{self.num_in_flight} sequences are in flight (--max-num-queued-reqs {limit})"
                )
        tokens_limit = self.max_num_queued_tokens
        if tokens_limit is not None and self.engine.num_prefill_tokens >= tokens_limit:
            raise overloaded(
                f"{self.engine.num_prefill_tokens} prompt tokens wait for prefill "
                f"(--max-num-queued-tokens {tokens_limit})"
            )
        self.num_in_flight += num_seqs
        return Ticket(self, num_seqs)


def overloaded(why: str) -> APIError:
    """The 503 of a server turned away by load, shared by every queue that does it."""
    return APIError(
        f"The server is overloaded: {why}; retry later",
        status=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _num_seqs(body: Any) -> tuple[int, str]:
    """The sequences a body asks for, and the field that asks, read without parsing it: n per
    prompt (a completion may send a list of prompts); a pooling request runs one per input,
    document or pair. Whatever is malformed counts 1 and fails validation later."""
    if not isinstance(body, dict):
        return 1, "n"
    for field in ("input", "documents", "text_2", "text_1"):  # pooling: one per entry
        entries = body.get(field)
        # (a Responses `input` is a list of items, dicts: one sequence)
        if isinstance(entries, list) and entries and not isinstance(entries[0], (int, dict)):
            return len(entries), field
    n = body.get("n")
    n = n if isinstance(n, int) and n > 1 else 1
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return n * len(prompt), "n"
    return n, "n"


class Ticket:
    """One admitted request's place; given back once, however its answer ends."""

    def __init__(self, admission: Admission, num_seqs: int) -> None:
        self._admission: Admission | None = admission
        self._num_seqs = num_seqs

    def release(self) -> None:
        if self._admission is not None:
            self._admission.num_in_flight -= self._num_seqs
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
