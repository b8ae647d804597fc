"""What the scheduler needs from the structured-output manager, as a protocol: the manager lives
outside `core` (it needs torch and a grammar library); the scheduler only asks and tells."""

from __future__ import annotations

from typing import Protocol

from lmserve.core.request import Request


class GrammarTracker(Protocol):
    def is_ready(self, request: Request) -> bool:
        """Whether a waiting request may be scheduled (no grammar, or its grammar is compiled)."""
        ...

    def accept(self, request: Request, token_id: int) -> bool:
        """Advance the request's grammar past a sampled token; True when it must stop now."""
        ...

    def remove(self, req_id: str) -> None:
        """Forget a finished request's grammar state."""
        ...
