"""What the scheduler needs from the structured-output manager, as a protocol: the manager lives
outside `core` (it needs torch and a grammar library); the scheduler only asks and tells."""

from __future__ import annotations

from typing import Protocol

from lmserve.core.request import Request
from lmserve.core.scheduler_output import GrammarBitmask


class GrammarTracker(Protocol):
    def is_ready(self, request: Request) -> bool:
        """Whether a waiting request may be scheduled (no grammar, or its grammar is compiled)."""
        ...

    def take_failed(self) -> list[str]:
        """Requests whose grammar could not be built since the last call: they end aborted."""
        ...

    def wait_for_compile(self, timeout_s: float) -> None:
        """Block until a pending grammar is compiled, or the timeout (at once when none is)."""
        ...

    def grammar_bitmask(self, req_ids: list[str]) -> GrammarBitmask | None:
        """The allowed next tokens of those of `req_ids` whose grammar is in force."""
        ...

    def accept(self, request: Request, token_id: int) -> bool:
        """Advance the request's grammar past a sampled token; True when it must stop now."""
        ...

    def remove(self, req_id: str) -> None:
        """Forget a finished request's grammar state."""
        ...
