"""The pooling runner's scheduler: prompt-only requests, packed whole into steps.

A pooling request is one forward pass over its prompt: it never decodes and an encoder holds no
KV cache, so there are no blocks to allocate. Each step takes waiting prompts in arrival order
while they fit `max_num_batched_tokens` and `max_num_seqs` (a prompt is never split: the engine
config makes the budget at least `max_model_len`) and finishes them all. A step that fails is
run again one request at a time, so only the request that fails alone ends with an error.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from lmserve.config import SchedulerConfig
from lmserve.core.request import Request
from lmserve.engine.messages import EngineCoreOutput, FinishReason, PooledData, SchedulerStats


@dataclass(frozen=True)
class PoolingBatch:
    requests: list[Request]


class PoolingScheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.waiting: deque[Request] = deque()
        self._suspects: set[str] = set()  # of a failed batch: they run alone
        self._step_tokens = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting)

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        """Drop them (the frontend already stopped waiting for them)."""
        gone = set(req_ids)
        self.waiting = deque(r for r in self.waiting if r.req_id not in gone)
        self._suspects -= gone

    def schedule(self) -> PoolingBatch:
        batch: list[Request] = []
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(batch) < self.config.max_num_seqs:
            request = self.waiting[0]
            if batch and (request.num_prompt_tokens > budget or request.req_id in self._suspects):
                break
            batch.append(self.waiting.popleft())
            budget -= request.num_prompt_tokens
            if request.req_id in self._suspects:
                break  # a suspect runs alone
        now = time.time()
        for request in batch:
            request.first_scheduled_time = now
        self._step_tokens = sum(r.num_prompt_tokens for r in batch)
        return PoolingBatch(batch)

    def finish(self, batch: PoolingBatch, pooled: list[PooledData]) -> list[EngineCoreOutput]:
        outputs = []
        for request, data in zip(batch.requests, pooled, strict=True):
            self._suspects.discard(request.req_id)
            outputs.append(
                EngineCoreOutput(
                    request.req_id,
                    [],
                    FinishReason.STOP,
                    first_scheduled_time=request.first_scheduled_time,
                    pooled=data,
                )
            )
        return outputs

    def fail(self, batch: PoolingBatch) -> list[EngineCoreOutput]:
        """A step that raised: a lone request is the culprit and ends with an error; a batch's
        requests go back to the front to run one at a time."""
        if len(batch.requests) == 1:
            (request,) = batch.requests
            self._suspects.discard(request.req_id)
            return [EngineCoreOutput(request.req_id, [], FinishReason.ERROR)]
        for request in reversed(batch.requests):
            self._suspects.add(request.req_id)
            self.waiting.appendleft(request)
        return []

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=0,  # a pooling request runs within the step that takes it
            num_waiting=len(self.waiting),
            kv_cache_usage=0.0,
            num_free_blocks=0,
            num_usable_blocks=0,
            num_preemptions=0,
            prefix_cache_queries=0,
            prefix_cache_hits=0,
            num_step_tokens=self._step_tokens,
        )
