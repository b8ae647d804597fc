"""Continuous batching with no prefill/decode phases.

Each step, every running request's `num_computed_tokens` catches up towards `num_tokens` under a
token budget; a long prompt simply takes several steps (chunked prefill). When blocks run out the
newest running request is preempted by recompute: its blocks are freed and it restarts from the
waiting queue, usually hitting its own blocks in the prefix cache.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Collection, Iterable

from lmserve.config import SchedulerConfig
from lmserve.core.grammar_tracker import GrammarTracker
from lmserve.core.kv_cache_manager import KVCacheManager
from lmserve.core.request import Request, RequestStatus
from lmserve.core.scheduler_output import (
    CachedRequestData,
    GrammarBitmask,
    NewRequestData,
    SampledTokens,
    SchedulerOutput,
)
from lmserve.engine.messages import EngineCoreOutput, FinishReason, SchedulerStats
from lmserve.spec_decode.config import SpeculativeConfig
from lmserve.spec_decode.ngram import NgramProposer

logger = logging.getLogger(__name__)

# How long a scheduler with nothing to run waits for a waiting request's grammar to compile, so an
# engine with only compiling requests sleeps instead of spinning.
_GRAMMAR_WAIT_S = 0.01


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        grammars: GrammarTracker | None = None,
        max_loras: int = 0,
        speculative: SpeculativeConfig | None = None,
    ) -> None:
        self.config = config
        self.max_loras = max_loras  # most adapters among running requests (0: LoRA is off)
        self.kv = kv_cache_manager
        self.grammars = grammars
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()  # to tell the worker at the next step
        self._grammar_failures: list[EngineCoreOutput] = []  # reported by the next update
        self._known_to_worker: set[str] = set()
        self._suspects: set[str] = set()  # in a batch that failed; each runs alone until it passes
        # cumulative counters since start, for metrics and tests
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of which found
        self._step_tokens = 0  # tokens the last step scheduled
        self.speculative = speculative
        self._proposer = (
            NgramProposer(speculative.prompt_lookup_min, speculative.prompt_lookup_max)
            if speculative and not speculative.uses_draft_model
            else None
        )
        self.spec_num_drafts = 0  # steps that checked a request's guesses
        self.spec_num_draft_tokens = 0
        self.spec_accepted_per_pos = [0] * (
            speculative.num_speculative_tokens if speculative else 0
        )

    # ---- queue management -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in use")
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def abort_requests(self, req_ids: Iterable[str]) -> list[Request]:
        """Finish the given requests now and free their blocks; unknown ids are ignored."""
        aborted = []
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is not None and not request.status.finished:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                aborted.append(request)
        return aborted

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # ---- scheduling -------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._suspects:
            return self._schedule_suspect()
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = request.num_tokens - request.num_computed_tokens
            # guesses ride along only where the budget has room for all the real tokens
            request.spec_token_ids = request.spec_token_ids[: max(budget - num_new, 0)]
            num_new = min(num_new + len(request.spec_token_ids), budget)
            num_held = self.kv.num_blocks(request.req_id)
            lookahead = self._lookahead(request, request.num_computed_tokens, num_new)
            while not self.kv.allocate_slots(request, num_new, num_lookahead=lookahead):
                if lookahead:  # nor do a draft model's guesses
                    lookahead = 0
                    continue
                if request.spec_token_ids:  # guesses never cost another request its blocks
                    num_new -= len(request.spec_token_ids)
                    request.spec_token_ids = []
                    continue
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is request:
                    break
            else:
                new_block_ids = self.kv.block_ids(request.req_id, num_held)
                cached_reqs.append(
                    CachedRequestData(request.req_id, new_block_ids, request.num_computed_tokens)
                )
                num_scheduled[request.req_id] = num_new
                budget -= num_new
                i += 1

        # Admit waiting requests in order, only when nothing had to be preempted this step; one
        # whose grammar is still compiling is passed over, not waited for.
        skipped: list[Request] = []
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            if self.grammars is not None and not self.grammars.is_ready(request):
                skipped.append(self.waiting.popleft())
                continue
            if not self._lora_fits(request):  # waits until a running adapter's requests finish
                skipped.append(self.waiting.popleft())
                continue
            hits = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - len(hits) * self.kv.block_size, budget)
            lookahead = self._lookahead(request, len(hits) * self.kv.block_size, num_new)
            if not (
                lookahead and self.kv.allocate_slots(request, num_new, hits, lookahead)
            ) and not self.kv.allocate_slots(request, num_new, hits):
                break
            self.waiting.popleft()
            new_reqs.append(self._start(request, len(hits) * self.kv.block_size))
            num_scheduled[request.req_id] = num_new
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        if self.grammars is not None:
            self._abort_failed_grammars()
            if not num_scheduled and self.waiting:
                self.grammars.wait_for_compile(_GRAMMAR_WAIT_S)
        return self._output(new_reqs, cached_reqs, num_scheduled)

    def _lookahead(self, request: Request, num_computed: int, num_new: int) -> int:
        """Slots past a sampling request's scheduled tokens for the KV of the guesses a draft
        model makes after the step (none for n-gram guesses, which run no model)."""
        spec = self.speculative
        if spec is None or not spec.uses_draft_model or num_computed + num_new < request.num_tokens:
            return 0
        room = self.config.max_model_len - num_computed - num_new
        return max(0, min(spec.num_speculative_tokens, room))

    def _schedule_suspect(self) -> SchedulerOutput:
        """After a batch failed for a reason nothing could pin on one request, its requests run
        one per step (the others wait), so the one that fails alone is the one that ends."""
        request = next(r for r in self.waiting if r.req_id in self._suspects)
        while True:
            hits = self.kv.get_computed_blocks(request)
            num_computed = len(hits) * self.kv.block_size
            num_new = min(request.num_tokens - num_computed, self.config.max_num_batched_tokens)
            if self._lora_fits(request) and self.kv.allocate_slots(request, num_new, hits):
                break
            self._preempt(self.running.pop())  # the cache holds max_model_len, so it ends
        self.waiting.remove(request)
        new = self._start(request, num_computed)
        return self._output([new], [], {request.req_id: num_new})

    def _start(self, request: Request, num_computed: int) -> NewRequestData:
        """Move a request that got its blocks from waiting to running."""
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_computed
            request.first_scheduled_time = time.time()
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_computed
        request.num_computed_tokens = num_computed
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return NewRequestData(
            req_id=request.req_id,
            token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            sampling_params=request.sampling_params,
            block_ids=self.kv.block_ids(request.req_id),
            num_computed_tokens=num_computed,
            eos_token_id=request.eos_token_id,
            lora_request=request.lora_request,
            prompt_embeds=request.prompt_embeds,
            encoder_features=request.encoder_features,
            cross_block_ids=self.kv.cross_block_ids(request.req_id),
            images=request.images,
        )

    def _output(
        self,
        new_reqs: list[NewRequestData],
        cached_reqs: list[CachedRequestData],
        num_scheduled: dict[str, int],
    ) -> SchedulerOutput:
        sampling = []
        spec: dict[str, list[int]] = {}
        for request in self.running:
            if request.req_id in num_scheduled:
                request.num_computed_tokens += num_scheduled[request.req_id]
                self._known_to_worker.add(request.req_id)
                if request.spec_token_ids:
                    spec[request.req_id] = request.spec_token_ids
                if request.num_computed_tokens == request.num_tokens + len(request.spec_token_ids):
                    sampling.append(request.req_id)
        finished, self._finished_ids = self._finished_ids, set()
        self._step_tokens = sum(num_scheduled.values())
        return SchedulerOutput(
            new_reqs=new_reqs,
            cached_reqs=cached_reqs,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=self._step_tokens,
            finished_req_ids=finished,
            sampling_req_ids=sampling,
            spec_token_ids=spec,
        )

    def grammar_bitmask(self, output: SchedulerOutput) -> GrammarBitmask | None:
        """The allowed next tokens of the requests sampling this step under a grammar."""
        if self.grammars is None or not output.sampling_req_ids:
            return None
        return self.grammars.grammar_bitmask(output.sampling_req_ids)

    def _abort_failed_grammars(self) -> None:
        """A grammar that failed to build (the frontend checks specs, so rarely) aborts its
        request; the next update reports it."""
        assert self.grammars is not None
        for request in self.abort_requests(self.grammars.take_failed()):
            self._grammar_failures.append(EngineCoreOutput(request.req_id, [], FinishReason.ABORT))

    def _lora_fits(self, request: Request) -> bool:
        """Whether admitting `request` keeps the running adapters within max_loras."""
        if request.lora_request is None:
            return True
        running = {r.lora_request.lora_int_id for r in self.running if r.lora_request}
        return request.lora_request.lora_int_id in running or len(running) < self.max_loras

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._forget_in_worker(request.req_id)

    # ---- results ----------------------------------------------------------------------------
    def update_from_output(
        self, output: SchedulerOutput, sampled: dict[str, SampledTokens]
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply token-level stops, free finished requests' blocks."""
        updates, self._grammar_failures = self._grammar_failures, []
        self._suspects.difference_update(output.num_scheduled_tokens)  # passed alone
        for req_id in output.num_scheduled_tokens:
            request = self.requests.get(req_id)
            if request is None or request.status.finished:
                continue  # aborted while the step ran
            result = sampled.get(req_id)
            drafts = output.spec_token_ids.get(req_id)
            if drafts:
                self._take_back_rejected(request, drafts, result)
            try:
                new_tokens = self._append_tokens(request, result)
            except Exception:  # noqa: BLE001 - one request's grammar fails it alone
                logger.exception("request %s failed applying its sampled tokens", req_id)
                self._finish(request, RequestStatus.FINISHED_ERROR)
                updates.append(EngineCoreOutput(req_id, [], FinishReason.ERROR))
                continue
            if new_tokens or (
                result is not None
                and (result.prompt_logprobs is not None or result.no_speech_prob is not None)
            ):
                updates.append(
                    EngineCoreOutput(
                        req_id=req_id,
                        new_token_ids=new_tokens,
                        finish_reason=request.status.finish_reason,
                        stop_reason=request.stop_reason,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                        first_scheduled_time=request.first_scheduled_time,
                        logprobs=result.logprobs if result else None,
                        prompt_logprobs=result.prompt_logprobs if result else None,
                        no_speech_prob=result.no_speech_prob if result else None,
                    )
                )
            if new_tokens and self.speculative is not None and not request.status.finished:
                self._propose(request, result)
        return updates

    def _take_back_rejected(
        self, request: Request, drafts: list[int], result: SampledTokens | None
    ) -> None:
        """The step computed KV for every guess; those after the first rejected one (whose
        token the model replaced) hold wrong tokens' KV and are computed again later."""
        num_accepted = max(len(result.token_ids) - 1, 0) if result is not None else 0
        request.num_computed_tokens -= len(drafts) - num_accepted
        request.spec_token_ids = []
        self.spec_num_drafts += 1
        self.spec_num_draft_tokens += len(drafts)
        for pos in range(num_accepted):
            self.spec_accepted_per_pos[pos] += 1

    def _propose(self, request: Request, result: SampledTokens | None) -> None:
        """Guess the request's next tokens for its next step (a draft model's guesses came
        with its sampled tokens). Requests whose sampling depends on the tokens before each
        position (penalties, a grammar) decode one token a step."""
        assert self.speculative is not None
        params = request.sampling_params
        if params.structured_outputs is not None or params.has_penalties:
            return
        # room for every guess plus the model's own token, within both length limits
        k = min(
            self.speculative.num_speculative_tokens,
            self.config.max_model_len - request.num_tokens - 1,
        )
        if params.max_tokens is not None:
            k = min(k, params.max_tokens - request.num_output_tokens - 1)
        if self._proposer is not None:
            request.spec_token_ids = self._proposer.propose(request.all_token_ids, k)
        elif result is not None and result.draft_token_ids and k > 0:
            request.spec_token_ids = result.draft_token_ids[:k]

    def _append_tokens(self, request: Request, result: SampledTokens | None) -> list[int]:
        """Apply one request's sampled tokens until a stop; the tokens kept."""
        new_tokens: list[int] = []
        for token_id in result.token_ids if result is not None else ():
            request.append_output_token(token_id)
            new_tokens.append(token_id)
            if self._check_stop(request, token_id):
                break
            if self.grammars is not None and self.grammars.accept(request, token_id):
                self._finish(request, RequestStatus.FINISHED_STOPPED)
                break
        return new_tokens

    def fail_step(
        self, output: SchedulerOutput, culprits: Collection[str] | None
    ) -> list[EngineCoreOutput]:
        """A scheduled step raised. Its KV may be half written, so its requests keep none of what
        they cached in it and go back to recompute; `culprits` (named by the part that failed)
        end with an error. With none named, a lone request is the culprit, and a batch's
        requests become suspects that run alone until one fails by itself."""
        scheduled = [
            r for req_id in output.num_scheduled_tokens if (r := self.requests.get(req_id))
        ]
        if culprits is None and len(scheduled) == 1:
            culprits = [scheduled[0].req_id]
        elif culprits is None:
            self._suspects.update(r.req_id for r in scheduled)
        failed = set(culprits or ())
        updates = []
        self._finished_ids |= output.finished_req_ids  # the worker may not have seen them
        for request in reversed(scheduled):  # preempted to the front of the queue, in order
            num_written = request.num_computed_tokens - output.num_scheduled_tokens[request.req_id]
            self.kv.free(request, num_written)
            self.running.remove(request)
            if request.req_id in failed:
                self._finish(request, RequestStatus.FINISHED_ERROR)
                updates.append(EngineCoreOutput(request.req_id, [], FinishReason.ERROR))
            else:
                self._preempt(request)
        return updates

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            num_usable_blocks=self.kv.pool.num_usable_blocks,
            num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            num_step_tokens=self._step_tokens,
            spec_num_drafts=self.spec_num_drafts,
            spec_num_draft_tokens=self.spec_num_draft_tokens,
            spec_num_accepted_tokens=sum(self.spec_accepted_per_pos),
            spec_accepted_per_pos=list(self.spec_accepted_per_pos),
        )

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """vLLM's order: the length limits first, then (past min_tokens) EOS and stop ids."""
        params = request.sampling_params
        max_tokens = params.max_tokens
        if (
            max_tokens is not None and request.num_output_tokens >= max_tokens
        ) or request.num_tokens >= self.config.max_model_len:
            self._finish(request, RequestStatus.FINISHED_LENGTH)
            return True
        if request.num_output_tokens < params.min_tokens:
            return False
        if not params.ignore_eos and token_id == request.eos_token_id:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return True
        if token_id in params.stop_token_ids:
            request.stop_reason = token_id
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            return True
        return False

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """The only exit: status set, blocks freed, removed from the queues at once."""
        request.status = status
        self.kv.free(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        del self.requests[request.req_id]
        self._suspects.discard(request.req_id)
        if self.grammars is not None:
            self.grammars.remove(request.req_id)
        self._forget_in_worker(request.req_id)

    def _forget_in_worker(self, req_id: str) -> None:
        if req_id in self._known_to_worker:
            self._known_to_worker.discard(req_id)
            self._finished_ids.add(req_id)
