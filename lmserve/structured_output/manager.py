"""The engine core's side of structured outputs: compiles grammars off the step loop, tracks each
constrained request's matcher, and fills the step's token bitmask.

It is the one owner of grammar state. The scheduler asks it whether a waiting request's grammar is
ready, tells it each sampled token, and drops a request's state when the request finishes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmserve.config import StructuredOutputConfig
from lmserve.core.request import Request
from lmserve.core.scheduler_output import GrammarBitmask
from lmserve.structured_output.backend import GrammarBackend, Matcher, backend_class
from lmserve.structured_output.spec import GrammarSpec

logger = logging.getLogger(__name__)

_MAX_CACHED_GRAMMARS = 256


@dataclass
class _Prepared:
    matcher: Matcher
    reasoning_ended: bool


@dataclass
class _RequestGrammar:
    future: Future[_Prepared]
    matcher: Matcher | None = None
    reasoning_ended: bool = True
    end_window: list[int] = field(default_factory=list)  # last output ids, to spot reasoning end


class StructuredOutputManager:
    def __init__(
        self,
        config: StructuredOutputConfig,
        tokenizer_path: Path,
        vocab_size: int,
        max_num_seqs: int,
    ) -> None:
        self.config = config
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.max_num_seqs = max_num_seqs
        self._states: dict[str, _RequestGrammar] = {}
        self._failed: dict[str, str] = {}  # req_id -> why its grammar could not be built
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the lazy tokenizer/backends and the cache
        self._tokenizer: Any = None
        self._backends: dict[str, GrammarBackend] = {}
        self._compiled: OrderedDict[tuple[str, GrammarSpec], Any] = OrderedDict()
        self._reasoning_ids: tuple[list[int], list[int]] | None = None
        self._bitmask: np.ndarray | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Track a constrained request: at once when its grammar is already compiled (the
        common case of many requests with one schema), else compiled in the background."""
        params = request.sampling_params.structured_outputs
        if params is None:
            return
        backend_name, spec = params.backend or "xgrammar", GrammarSpec.from_params(params)
        future: Future[_Prepared] = Future()
        prepared = self._prepare_cached(backend_name, spec, request.prompt_token_ids)
        if prepared is not None:
            future.set_result(prepared)
        else:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmserve-grammar")
            future = self._executor.submit(
                self._prepare, backend_name, spec, request.prompt_token_ids
            )
        self._states[request.req_id] = _RequestGrammar(future)

    def is_ready(self, request: Request) -> bool:
        """Whether the request may be scheduled: unconstrained, or its matcher is built."""
        state = self._states.get(request.req_id)
        if state is None or state.matcher is not None:
            return True
        if not state.future.done():
            return False
        try:
            prepared = state.future.result()
        except Exception as exc:  # noqa: BLE001 - reported to the request, the core goes on
            logger.error("request %s: grammar failed to compile: %s", request.req_id, exc)
            self._failed[request.req_id] = str(exc)
            del self._states[request.req_id]
            return False
        state.matcher, state.reasoning_ended = prepared.matcher, prepared.reasoning_ended
        return True

    def take_failed(self) -> list[str]:
        """Requests whose grammar could not be built, since the last call (the core aborts them)."""
        failed, self._failed = list(self._failed), {}
        return failed

    def accept(self, request: Request, token_id: int) -> bool:
        """Advance the request's matcher past a sampled token. True when the request must stop:
        its grammar is complete, or (never expected, the mask forbids it) it rejected the token."""
        state = self._states.get(request.req_id)
        if state is None or state.matcher is None:
            return False
        if not state.reasoning_ended:
            state.reasoning_ended = self._reasoning_ends(state, token_id)
            return False
        if not state.matcher.accept(token_id):
            logger.warning("request %s: the grammar rejected token %d", request.req_id, token_id)
            return True
        return state.matcher.is_terminated()

    def remove(self, req_id: str) -> None:
        state = self._states.pop(req_id, None)
        if state is not None:
            state.future.cancel()

    def has_pending(self) -> bool:
        return any(s.matcher is None for s in self._states.values())

    def wait_for_compile(self, timeout_s: float) -> None:
        """Block until a pending grammar is compiled (or the timeout), so an idle core sleeps."""
        pending = [s.future for s in self._states.values() if s.matcher is None]
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- per step -----------------------------------------------------------------------------
    def grammar_bitmask(self, req_ids: list[str]) -> GrammarBitmask | None:
        """Masks for those of this step's sampling requests whose grammar is in force, in one
        array (the matchers fill a torch view of it)."""
        constrained = []
        for req_id in req_ids:
            state = self._states.get(req_id)
            if (
                state is not None
                and state.matcher is not None
                and state.reasoning_ended
                and not state.matcher.is_terminated()
            ):
                constrained.append(req_id)
        if not constrained:
            return None
        if self._bitmask is None:
            self._bitmask = np.empty((self.max_num_seqs, -(-self.vocab_size // 32)), np.int32)
        rows = torch.from_numpy(self._bitmask)
        for row, req_id in enumerate(constrained):
            matcher = self._states[req_id].matcher
            assert matcher is not None
            matcher.fill_bitmask(rows, row)
        return GrammarBitmask(constrained, self._bitmask[: len(constrained)])

    # ---- compile thread -----------------------------------------------------------------------
    def _prepare(self, backend_name: str, spec: GrammarSpec, prompt_ids: list[int]) -> _Prepared:
        """Compile (or reuse) the grammar and start a matcher; runs in the compile thread."""
        with self._lock:
            backend = self._backend(backend_name)
            key = (backend_name, spec)
            compiled = self._compiled.get(key)
            if compiled is None:
                compiled = backend.compile(spec)
                self._compiled[key] = compiled
                if len(self._compiled) > _MAX_CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(key)
            reasoning_ids = self._reasoning_token_ids()
        ended = reasoning_ids is None or _closed_in(prompt_ids, *reasoning_ids)
        return _Prepared(backend.matcher(compiled), ended)

    def _prepare_cached(
        self, backend_name: str, spec: GrammarSpec, prompt_ids: list[int]
    ) -> _Prepared | None:
        """`_prepare` in the caller's thread when nothing needs compiling or loading, and the
        compile thread is not busy; None otherwise."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            key = (backend_name, spec)
            compiled = self._compiled.get(key)
            needs_markers = self.config.reasoning_end is not None and self._reasoning_ids is None
            if compiled is None or needs_markers:
                return None
            self._compiled.move_to_end(key)
            reasoning_ids = self._reasoning_token_ids()
            backend = self._backends[backend_name]
        finally:
            self._lock.release()
        ended = reasoning_ids is None or _closed_in(prompt_ids, *reasoning_ids)
        return _Prepared(backend.matcher(compiled), ended)

    def _backend(self, name: str) -> GrammarBackend:
        if name not in self._backends:
            self._backends[name] = backend_class(name)(self._load_tokenizer(), self.vocab_size)
        return self._backends[name]

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from lmserve.engine.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer

    def _reasoning_token_ids(self) -> tuple[list[int], list[int]] | None:
        start, end = self.config.reasoning_start, self.config.reasoning_end
        if end is None:
            return None
        if self._reasoning_ids is None:
            tokenizer = self._load_tokenizer()
            start_ids = tokenizer.encode(start, add_special_tokens=False) if start else []
            self._reasoning_ids = (start_ids, tokenizer.encode(end, add_special_tokens=False))
        return self._reasoning_ids

    def _reasoning_ends(self, state: _RequestGrammar, token_id: int) -> bool:
        assert self._reasoning_ids is not None
        end_ids = self._reasoning_ids[1]
        state.end_window = (state.end_window + [token_id])[-len(end_ids) :]
        return state.end_window == end_ids


def _closed_in(prompt_ids: list[int], start_ids: list[int], end_ids: list[int]) -> bool:
    """Whether the prompt already ended the thinking: its last end marker follows its last start
    marker (Qwen3's template with enable_thinking=False renders a closed, empty think block)."""
    last_end = _rfind(prompt_ids, end_ids)
    return last_end >= 0 and last_end > _rfind(prompt_ids, start_ids)


def _rfind(ids: list[int], pattern: list[int]) -> int:
    if not pattern:
        return -1
    n = len(pattern)
    for i in range(len(ids) - n, -1, -1):
        if ids[i : i + n] == pattern:
            return i
    return -1
