"""Scheduler driven by hand: schedule() -> fake sampled tokens -> update_from_output().

A fake worker mirrors what the real one keeps from each `SchedulerOutput` (which requests it
holds, their block tables and computed lengths), so the protocol itself is checked every step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest

from lmserve.config import SchedulerConfig
from lmserve.core.grammar_tracker import GrammarTracker
from lmserve.core.kv_cache_manager import KVCacheManager, cdiv
from lmserve.core.request import Request, RequestStatus
from lmserve.core.scheduler import Scheduler
from lmserve.core.scheduler_output import GrammarBitmask, SampledTokens, SchedulerOutput
from lmserve.engine.messages import EngineCoreOutput, FinishReason
from lmserve.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS = 2
TokenFn = Callable[[Request], int]


def count_up(request: Request) -> int:
    """The default fake model: 1000, 1001, ... never EOS or a stop id by accident."""
    return 1000 + request.num_output_tokens


class FakeWorker:
    """Applies each SchedulerOutput the way the worker must, and checks it is consistent."""

    def __init__(self) -> None:
        self.block_ids: dict[str, list[int]] = {}
        self.num_computed: dict[str, int] = {}
        self.failed = False  # after a failed step, forgetting twice is allowed (as the real one)

    def apply(self, out: SchedulerOutput, kv: KVCacheManager) -> None:
        for req_id in out.finished_req_ids:
            if self.failed and req_id not in self.block_ids:
                continue
            assert req_id in self.block_ids, f"told to forget unknown {req_id}"
            del self.block_ids[req_id], self.num_computed[req_id]
        for new in out.new_reqs:
            assert new.req_id not in self.block_ids, f"{new.req_id} sent as new twice"
            self.block_ids[new.req_id] = list(new.block_ids)
            self.num_computed[new.req_id] = new.num_computed_tokens
        for cached in out.cached_reqs:
            assert cached.req_id in self.block_ids, f"diff for unknown {cached.req_id}"
            assert cached.num_computed_tokens == self.num_computed[cached.req_id]
            self.block_ids[cached.req_id].extend(cached.new_block_ids)
        assert set(out.num_scheduled_tokens) == {r.req_id for r in out.new_reqs} | {
            r.req_id for r in out.cached_reqs
        }
        for req_id, num in out.num_scheduled_tokens.items():
            assert num > 0
            assert self.block_ids[req_id] == kv.block_ids(req_id)
            self.num_computed[req_id] += num
            assert self.num_computed[req_id] <= len(self.block_ids[req_id]) * kv.block_size


class Harness:
    def __init__(
        self,
        *,
        num_blocks: int = 64,
        max_num_batched_tokens: int = 64,
        max_num_seqs: int = 16,
        max_model_len: int = 1024,
        enable_caching: bool = True,
        grammars: GrammarTracker | None = None,
    ) -> None:
        self.kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=enable_caching)
        self.config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
        )
        self.sched = Scheduler(self.config, self.kv, grammars)
        self.worker = FakeWorker()
        self.finished: dict[str, Request] = {}

    def add(self, req_id: str, prompt: list[int] | range, **params) -> Request:
        params.setdefault("max_tokens", 4)
        request = Request(req_id, list(prompt), SamplingParams(**params), eos_token_id=EOS)
        self.sched.add_request(request)
        return request

    def schedule(self) -> SchedulerOutput:
        out = self.sched.schedule()
        self.kv.check_invariants()
        assert sum(out.num_scheduled_tokens.values()) == out.total_num_scheduled_tokens
        assert out.total_num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert len(self.sched.running) <= self.config.max_num_seqs
        for request in self.sched.running:
            assert request.status == RequestStatus.RUNNING
            assert request.num_computed_tokens <= request.num_tokens
        for request in self.sched.waiting:
            assert request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert self.kv.block_ids(request.req_id) == []
        self.worker.apply(out, self.kv)
        return out

    def sample(
        self, out: SchedulerOutput, token_fn: TokenFn = count_up
    ) -> dict[str, SampledTokens]:
        """One token for each request the scheduler says samples: those whose prompt (and
        outputs) are now fully computed, in batch order."""
        complete = [
            req_id
            for req_id in out.num_scheduled_tokens
            if self.sched.requests[req_id].num_computed_tokens
            == self.sched.requests[req_id].num_tokens
        ]
        assert out.sampling_req_ids == complete
        return {
            req_id: SampledTokens([token_fn(self.sched.requests[req_id])])
            for req_id in out.sampling_req_ids
        }

    def update(
        self, out: SchedulerOutput, sampled: dict[str, SampledTokens]
    ) -> list[EngineCoreOutput]:
        live = [
            self.sched.requests[r] for r in out.num_scheduled_tokens if r in self.sched.requests
        ]
        updates = self.sched.update_from_output(out, sampled)
        self.kv.check_invariants()
        for request in live:
            if request.status.finished:
                self.finished[request.req_id] = request
                assert request.req_id not in self.sched.requests
                assert self.kv.block_ids(request.req_id) == []
        return updates

    def fail(self, out: SchedulerOutput, culprits: list[str] | None) -> list[EngineCoreOutput]:
        """The step of `out` raised (its KV may be half written)."""
        self.worker.failed = True
        updates = self.sched.fail_step(out, culprits)
        self.kv.check_invariants()
        for request in self.sched.waiting:
            assert self.kv.block_ids(request.req_id) == []
        return updates

    def step(self, token_fn: TokenFn = count_up) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
        out = self.schedule()
        return out, self.update(out, self.sample(out, token_fn))

    def run_until_done(self, token_fn: TokenFn = count_up, max_steps: int = 500) -> int:
        for num_steps in range(1, max_steps + 1):
            self.step(token_fn)
            if self.sched.num_unfinished == 0:
                return num_steps
        raise AssertionError(f"not done after {max_steps} steps")

    def all_blocks_free(self) -> bool:
        return self.kv.num_free_blocks == self.kv.pool.num_usable_blocks


def test_empty_schedule() -> None:
    h = Harness()
    out = h.schedule()
    assert out.is_empty
    assert out.new_reqs == [] and out.cached_reqs == [] and out.finished_req_ids == set()


def test_duplicate_request_id_is_rejected() -> None:
    h = Harness()
    h.add("a", range(5))
    with pytest.raises(ValueError):
        h.add("a", range(5))


# ---- token budget and chunked prefill -----------------------------------------------------------
def test_long_prompt_is_prefilled_in_chunks() -> None:
    h = Harness(max_num_batched_tokens=8)
    request = h.add("a", range(20), max_tokens=3)

    out, updates = h.step()
    assert out.num_scheduled_tokens == {"a": 8}
    assert [r.req_id for r in out.new_reqs] == ["a"] and out.new_reqs[0].num_computed_tokens == 0
    assert out.new_reqs[0].token_ids == list(range(20))
    assert out.new_reqs[0].num_prompt_tokens == 20
    assert len(out.new_reqs[0].block_ids) == 2
    assert updates == [] and request.num_output_tokens == 0

    out, updates = h.step()
    assert out.num_scheduled_tokens == {"a": 8}
    assert out.new_reqs == []
    assert [(c.req_id, c.num_computed_tokens, len(c.new_block_ids)) for c in out.cached_reqs] == [
        ("a", 8, 2)
    ]
    assert updates == []

    out, updates = h.step()  # the last 4 prompt tokens: the first sample
    assert out.num_scheduled_tokens == {"a": 4}
    assert [(u.req_id, u.new_token_ids) for u in updates] == [("a", [1000])]

    out, updates = h.step()  # decode
    assert out.num_scheduled_tokens == {"a": 1}
    assert [u.new_token_ids for u in updates] == [[1001]]
    assert request.num_computed_tokens == 21


def test_budget_is_shared_running_first() -> None:
    h = Harness(max_num_batched_tokens=10)
    h.add("a", range(6), max_tokens=8)
    h.add("b", range(100, 120), max_tokens=8)

    out, _ = h.step()  # a fully, b gets the remaining 4
    assert out.num_scheduled_tokens == {"a": 6, "b": 4}
    assert list(out.num_scheduled_tokens) == ["a", "b"]

    out, _ = h.step()  # a decodes 1, b gets 9
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 7}
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 1}
    assert out.total_num_scheduled_tokens == 2


def test_budget_exhausted_leaves_running_requests_unscheduled() -> None:
    h = Harness(max_num_batched_tokens=2)
    for i in range(3):
        h.add(f"r{i}", [i], max_tokens=5)
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 1}
    assert [r.req_id for r in h.sched.waiting] == ["r2"]
    out, _ = h.step()  # both running use the budget; r2 keeps waiting
    assert out.num_scheduled_tokens == {"r0": 1, "r1": 1}
    h.run_until_done()
    assert all(r.num_output_tokens == 5 for r in h.finished.values())


def test_max_num_seqs_caps_running_requests() -> None:
    h = Harness(max_num_seqs=2)
    for i in range(5):
        h.add(f"r{i}", range(10 * i, 10 * i + 3), max_tokens=2 + i)
    out, _ = h.step()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert len(h.sched.running) == 2 and len(h.sched.waiting) == 3

    out, _ = h.step()  # r0 finishes after its second token, in update
    assert "r0" in h.finished
    out, _ = h.step()
    assert out.finished_req_ids == {"r0"}
    assert [r.req_id for r in out.new_reqs] == ["r2"]
    for _ in range(50):
        h.step()
        assert len(h.sched.running) <= 2
        if not h.sched.num_unfinished:
            break
    assert sorted(h.finished) == [f"r{i}" for i in range(5)]
    assert h.all_blocks_free()


def test_decode_schedules_one_token_per_request() -> None:
    h = Harness()
    for i in range(4):
        h.add(f"r{i}", range(10 * i, 10 * i + 5 + i), max_tokens=6)
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"r0": 5, "r1": 6, "r2": 7, "r3": 8}
    for _ in range(5):
        out, updates = h.step()
        assert out.num_scheduled_tokens == {f"r{i}": 1 for i in range(4)}
        assert out.new_reqs == []
        assert all(len(u.new_token_ids) == 1 for u in updates) and len(updates) == 4
    assert h.sched.num_unfinished == 0


# ---- stopping -----------------------------------------------------------------------------------
def finish_of(h: Harness, req_id: str) -> tuple[RequestStatus, list[int], int | str | None]:
    request = h.finished[req_id]
    return request.status, request.output_token_ids, request.stop_reason


def test_finish_length_at_max_tokens() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=3)
    last_updates: list[EngineCoreOutput] = []
    for _ in range(3):
        _, last_updates = h.step()
    assert [(u.finish_reason, u.new_token_ids) for u in last_updates] == [("length", [1002])]
    assert finish_of(h, "a") == (RequestStatus.FINISHED_LENGTH, [1000, 1001, 1002], None)
    assert h.sched.num_unfinished == 0
    assert h.all_blocks_free()
    out = h.schedule()  # the worker hears about it at the next step
    assert out.finished_req_ids == {"a"} and out.is_empty


def test_finish_stop_on_eos() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=10)
    outputs = iter([7, EOS, 9])
    h.run_until_done(lambda _: next(outputs))
    assert finish_of(h, "a") == (RequestStatus.FINISHED_STOPPED, [7, EOS], None)
    assert h.finished["a"].status.finish_reason == "stop"
    assert h.all_blocks_free()


def test_ignore_eos_runs_to_max_tokens() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=4, ignore_eos=True)
    h.run_until_done(lambda _: EOS)
    assert finish_of(h, "a") == (RequestStatus.FINISHED_LENGTH, [EOS] * 4, None)


def test_finish_stop_on_stop_token_ids() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=10, stop_token_ids=[42, 43])
    outputs = iter([7, 8, 43, 9])
    _, updates = h.step(lambda _: next(outputs))
    _, updates = h.step(lambda _: next(outputs))
    _, updates = h.step(lambda _: next(outputs))
    assert [(u.finish_reason, u.stop_reason) for u in updates] == [("stop", 43)]
    assert finish_of(h, "a") == (RequestStatus.FINISHED_STOPPED, [7, 8, 43], 43)
    assert h.sched.num_unfinished == 0


def test_stop_token_ids_apply_even_with_ignore_eos() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=10, ignore_eos=True, stop_token_ids=[42])
    outputs = iter([EOS, 42])
    h.run_until_done(lambda _: next(outputs))
    assert finish_of(h, "a") == (RequestStatus.FINISHED_STOPPED, [EOS, 42], 42)


def test_no_eos_or_stop_before_min_tokens() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=10, min_tokens=3)
    h.run_until_done(lambda _: EOS)
    assert finish_of(h, "a") == (RequestStatus.FINISHED_STOPPED, [EOS] * 3, None)

    h.add("b", range(5), max_tokens=10, min_tokens=2, stop_token_ids=[42])
    h.run_until_done(lambda _: 42)
    assert finish_of(h, "b") == (RequestStatus.FINISHED_STOPPED, [42, 42], 42)


def test_max_tokens_applies_during_min_tokens_window() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=2, min_tokens=2)
    h.run_until_done(lambda _: EOS)
    assert h.finished["a"].output_token_ids == [EOS, EOS]
    assert h.finished["a"].status.finished


def test_finish_at_max_model_len() -> None:
    h = Harness(max_model_len=12)
    h.add("a", range(10), max_tokens=None)
    h.run_until_done()
    assert finish_of(h, "a") == (RequestStatus.FINISHED_LENGTH, [1000, 1001], None)
    assert h.finished["a"].num_tokens == 12
    assert h.all_blocks_free()


def test_only_sampled_tokens_are_appended_mid_prefill() -> None:
    h = Harness(max_num_batched_tokens=4)
    request = h.add("a", range(10), max_tokens=2)
    h.step()
    h.step()
    assert request.num_output_tokens == 0 and request.status == RequestStatus.RUNNING
    h.run_until_done()
    assert h.finished["a"].output_token_ids == [1000, 1001]


# ---- abort --------------------------------------------------------------------------------------
def test_abort_running_request_frees_blocks_at_once() -> None:
    h = Harness(num_blocks=17)
    a = h.add("a", range(10), max_tokens=10)
    h.add("b", range(100, 110), max_tokens=10)
    h.step()
    h.step()
    assert h.kv.num_free_blocks == 16 - 6

    aborted = h.sched.abort_requests(["a", "nonexistent"])
    assert aborted == [a]
    assert a.status == RequestStatus.FINISHED_ABORTED and a.status.finish_reason == "abort"
    assert h.kv.block_ids("a") == [] and h.kv.num_free_blocks == 16 - 3
    assert a not in h.sched.running and "a" not in h.sched.requests
    h.kv.check_invariants()
    assert h.sched.abort_requests(["a"]) == []  # already finished

    out, _ = h.step()
    assert out.finished_req_ids == {"a"}
    assert set(out.num_scheduled_tokens) == {"b"}
    out, _ = h.step()
    assert out.finished_req_ids == set()  # told once


def test_abort_waiting_request_is_never_sent_to_worker() -> None:
    h = Harness(max_num_seqs=1)
    h.add("a", range(5), max_tokens=3)
    b = h.add("b", range(5), max_tokens=3)
    h.step()
    assert h.sched.abort_requests(["b"]) == [b]
    assert b not in h.sched.waiting
    out, _ = h.step()
    assert "b" not in out.finished_req_ids
    h.run_until_done()
    assert "b" not in h.finished
    assert h.all_blocks_free()


def test_abort_between_schedule_and_update() -> None:
    h = Harness()
    h.add("a", range(5), max_tokens=3)
    h.add("b", range(50, 55), max_tokens=3)
    out = h.schedule()
    sampled = h.sample(out)
    h.sched.abort_requests(["a"])
    updates = h.update(out, sampled)
    assert [u.req_id for u in updates] == ["b"]
    out = h.schedule()
    assert out.finished_req_ids == {"a"}
    assert set(out.num_scheduled_tokens) == {"b"}


def test_abort_mid_prefill() -> None:
    h = Harness(max_num_batched_tokens=4)
    h.add("a", range(20))
    h.step()
    h.sched.abort_requests(["a"])
    assert h.all_blocks_free()
    out = h.schedule()
    assert out.finished_req_ids == {"a"} and out.is_empty


# ---- preemption ---------------------------------------------------------------------------------
def test_preemption_with_a_tiny_pool() -> None:
    # 6 usable blocks; each request grows from 2 blocks (5 prompt tokens) to 4 (13 tokens).
    h = Harness(num_blocks=7)
    prompts = {f"r{i}": list(range(10 * i, 10 * i + 5)) for i in range(3)}
    for req_id, prompt in prompts.items():
        h.add(req_id, prompt, max_tokens=8)

    preempted: list[tuple[str, list[int]]] = []
    resumed: list[str] = []
    for _ in range(200):
        out = h.schedule()
        preempted_now = [
            h.sched.requests[req_id]
            for req_id in out.finished_req_ids
            if req_id in h.sched.requests  # finished ones are gone: these were preempted
        ]
        for request in preempted_now:
            assert request.status == RequestStatus.PREEMPTED
            assert request.num_computed_tokens == 0 and request.num_preemptions >= 1
            assert request in h.sched.waiting and request not in h.sched.running
            preempted.append((request.req_id, list(request.all_token_ids)))
        if preempted_now:
            assert out.new_reqs == []  # nothing admitted in a step that preempted
        for new in out.new_reqs:
            if h.sched.requests[new.req_id].num_preemptions:
                resumed.append(new.req_id)
                # Resumes with prompt + outputs so far, all to recompute (minus cache hits).
                request = h.sched.requests[new.req_id]
                assert new.token_ids == request.all_token_ids
                assert new.token_ids[:5] == prompts[new.req_id]
                assert len(new.token_ids) > 5
                assert new.num_prompt_tokens == 5
                assert new.num_computed_tokens % BLOCK_SIZE == 0
                assert new.num_computed_tokens < len(new.token_ids)
        h.update(out, h.sample(out))
        if h.sched.num_unfinished == 0:
            break

    assert preempted, "the pool is too small for all three: someone must be preempted"
    assert {req_id for req_id, _ in preempted} <= set(resumed)
    for req_id, tokens in preempted:
        # What was sent on resumption is what the request held when it was preempted.
        assert h.finished[req_id].all_token_ids[: len(tokens)] == tokens
    assert sorted(h.finished) == ["r0", "r1", "r2"]
    for req_id, request in h.finished.items():
        assert request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == [1000 + i for i in range(8)], req_id
    assert h.all_blocks_free()
    assert not h.sched.running and not h.sched.waiting


def test_preemption_evicts_the_newest_running_request() -> None:
    h = Harness(num_blocks=5, max_num_seqs=2)  # 4 usable
    old = h.add("old", range(4), max_tokens=8)
    new = h.add("new", range(100, 104), max_tokens=8)
    late = h.add("late", range(200, 204), max_tokens=1)
    h.step()  # 1 block each, both sample
    h.step()  # both need a second block: 4 used
    assert h.kv.num_free_blocks == 0
    for _ in range(3):
        h.step()
    out = h.schedule()  # old's 9th token needs a third block: new is preempted
    assert out.finished_req_ids == {"new"}
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    # The victim goes back to the head of the queue, ahead of later arrivals.
    assert h.sched.running == [old] and list(h.sched.waiting) == [new, late]
    assert out.num_scheduled_tokens == {"old": 1}
    h.update(out, h.sample(out))
    admitted = []
    for _ in range(50):
        out, _ = h.step()
        admitted += [r.req_id for r in out.new_reqs]
        if not h.sched.num_unfinished:
            break
    assert admitted == ["new", "late"]
    assert h.finished["new"].output_token_ids == [1000 + i for i in range(8)]
    assert h.all_blocks_free()


def test_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    h = Harness(num_blocks=7)  # 6 usable
    h.add("old", range(4), max_tokens=12)
    victim = h.add("victim", range(100, 112), max_tokens=8)
    h.step()
    for _ in range(5):  # old's 9th token needs a third block at step 6: victim goes
        assert victim.status == RequestStatus.RUNNING
        h.step()
    assert victim.status == RequestStatus.PREEMPTED
    for _ in range(20):  # back once old has finished
        out, _ = h.step()
        if out.new_reqs:
            break
    (resumed,) = out.new_reqs
    assert resumed.req_id == "victim"
    assert resumed.num_computed_tokens > 0  # its freed blocks were still cached
    h.run_until_done()
    assert h.finished["victim"].output_token_ids == [1000 + i for i in range(8)]
    assert h.finished["victim"].num_cached_tokens == 0  # from its first scheduling only


def test_no_admission_in_a_step_that_preempted() -> None:
    # Without caching a victim needs no hits, so it would fit right back into a small chunk.
    h = Harness(num_blocks=4, max_num_batched_tokens=5, enable_caching=False)  # 3 usable
    a = h.add("a", range(3), max_tokens=10)
    b = h.add("b", range(100, 106), max_tokens=10)
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 3, "b": 2}
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 4}
    assert h.kv.num_free_blocks == 0 and b.num_output_tokens == 1

    out, _ = h.step()  # a's 5th token needs a second block: b is preempted
    assert out.finished_req_ids == {"b"}
    assert out.new_reqs == [] and out.num_scheduled_tokens == {"a": 1}
    assert b.status == RequestStatus.PREEMPTED and list(h.sched.waiting) == [b]
    assert h.kv.num_free_blocks == 1  # b's first chunk would fit, but must wait a step

    out, _ = h.step()
    (resumed,) = out.new_reqs
    assert resumed.req_id == "b" and resumed.num_computed_tokens == 0
    assert resumed.token_ids == [*range(100, 106), 1000]
    assert out.num_scheduled_tokens == {"a": 1, "b": 4}
    assert a.status == RequestStatus.RUNNING


def test_running_request_that_cannot_grow_preempts_itself() -> None:
    h = Harness(num_blocks=3)  # 2 usable
    first = h.add("first", range(4), max_tokens=2)
    second = h.add("second", range(100, 108), max_tokens=1)
    out, _ = h.step()  # first: 1 block; second: 2 blocks needed, only 1 left -> waits
    assert set(out.num_scheduled_tokens) == {"first"}
    h.run_until_done()
    assert first.status == second.status == RequestStatus.FINISHED_LENGTH
    assert h.all_blocks_free()


# ---- prefix caching through the scheduler -------------------------------------------------------
def test_same_step_requests_share_published_blocks() -> None:
    h = Harness()
    h.add("a", range(10), max_tokens=2)
    h.add("b", range(10), max_tokens=2)
    out, updates = h.step()
    a_new, b_new = out.new_reqs
    assert a_new.num_computed_tokens == 0
    assert b_new.num_computed_tokens == 8
    assert b_new.block_ids[:2] == a_new.block_ids[:2]
    assert b_new.block_ids[2] != a_new.block_ids[2]
    assert out.num_scheduled_tokens == {"a": 10, "b": 2}
    assert {u.req_id: u.num_cached_tokens for u in updates} == {"a": 0, "b": 8}
    h.run_until_done()
    assert h.all_blocks_free()


def test_later_request_hits_blocks_of_a_finished_one() -> None:
    h = Harness()
    h.add("a", range(13), max_tokens=2)
    h.run_until_done()
    h.add("b", list(range(13)) + [99], max_tokens=2)
    out, updates = h.step()
    assert out.new_reqs[0].num_computed_tokens == 12
    assert out.num_scheduled_tokens == {"b": 2}
    assert updates[0].num_cached_tokens == 12


def test_no_shared_blocks_without_caching() -> None:
    h = Harness(enable_caching=False)
    h.add("a", range(10), max_tokens=2)
    h.add("b", range(10), max_tokens=2)
    out, _ = h.step()
    assert [r.num_computed_tokens for r in out.new_reqs] == [0, 0]
    assert not set(out.new_reqs[0].block_ids) & set(out.new_reqs[1].block_ids)


def test_prompt_logprobs_request_recomputes_the_prompt() -> None:
    h = Harness()
    h.add("a", range(10), max_tokens=2)
    h.add("b", range(10), max_tokens=2, prompt_logprobs=1)
    out, _ = h.step()
    assert [r.num_computed_tokens for r in out.new_reqs] == [0, 0]
    assert out.num_scheduled_tokens == {"a": 10, "b": 10}


def test_tokens_after_a_stop_in_the_same_step_are_dropped() -> None:
    h = Harness()
    request = h.add("a", range(5), max_tokens=10)
    out = h.schedule()
    updates = h.update(out, {"a": SampledTokens([7, EOS, 9])})
    assert [(u.new_token_ids, u.finish_reason) for u in updates] == [([7, EOS], "stop")]
    assert request.output_token_ids == [7, EOS]
    assert request.all_token_ids == [*range(5), 7, EOS]


def test_max_tokens_caps_a_multi_token_step() -> None:
    h = Harness()
    request = h.add("a", range(5), max_tokens=2)
    out = h.schedule()
    updates = h.update(out, {"a": SampledTokens([7, 8, 9])})
    assert [(u.new_token_ids, u.finish_reason) for u in updates] == [([7, 8], "length")]
    assert request.output_token_ids == [7, 8]


# ---- a randomized workload ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_random_workload_finishes_with_all_blocks_free(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(num_blocks=14, max_num_batched_tokens=16, max_num_seqs=4)
    prefixes = [[rng.randrange(50, 500) for _ in range(8)] for _ in range(3)]
    expected: dict[str, int] = {}
    aborted: set[str] = set()
    next_id = 0
    for _ in range(400):
        if next_id < 24 and rng.random() < 0.4:
            req_id = f"r{next_id}"
            next_id += 1
            prompt = rng.choice(prefixes)[: rng.randrange(1, 9)]
            prompt += [rng.randrange(50, 500) for _ in range(rng.randrange(0, 12))]
            max_tokens = rng.randrange(1, 10)
            h.add(req_id, prompt, max_tokens=max_tokens, ignore_eos=True)
            expected[req_id] = max_tokens
        if h.sched.requests and rng.random() < 0.03:
            victim = rng.choice(sorted(h.sched.requests))
            h.sched.abort_requests([victim])
            aborted.add(victim)
            h.kv.check_invariants()
        h.step()
        for request in h.sched.running:
            held = len(h.kv.block_ids(request.req_id))
            assert held >= cdiv(request.num_computed_tokens, BLOCK_SIZE)
        if next_id == 24 and h.sched.num_unfinished == 0:
            break
    assert next_id == 24 and h.sched.num_unfinished == 0
    for req_id, max_tokens in expected.items():
        if req_id not in aborted:
            assert h.finished[req_id].num_output_tokens == max_tokens
    assert h.all_blocks_free()
    h.schedule()  # flush the last finished ids to the fake worker
    assert h.worker.block_ids == {}


class FakeGrammars:
    """A GrammarTracker whose compile finishes when the test says, and whose grammar ends after
    `length` accepted tokens."""

    def __init__(self, length: int = 100) -> None:
        self.ready: set[str] = set()
        self.failed: list[str] = []
        self.waits = 0
        self.asked: list[list[str]] = []  # req_ids of each grammar_bitmask call
        self.accepted: dict[str, list[int]] = {}
        self.removed: list[str] = []
        self.length = length

    def is_ready(self, request: Request) -> bool:
        return request.req_id in self.ready

    def take_failed(self) -> list[str]:
        failed, self.failed = self.failed, []
        return failed

    def wait_for_compile(self, timeout_s: float) -> None:
        self.waits += 1

    def grammar_bitmask(self, req_ids: list[str]) -> GrammarBitmask | None:
        self.asked.append(list(req_ids))
        constrained = [r for r in req_ids if r in self.ready]
        return GrammarBitmask(constrained, np.zeros((len(constrained), 1), np.int32))

    def accept(self, request: Request, token_id: int) -> bool:
        self.accepted.setdefault(request.req_id, []).append(token_id)
        return len(self.accepted[request.req_id]) >= self.length

    def remove(self, req_id: str) -> None:
        self.removed.append(req_id)


def test_request_waiting_for_its_grammar_does_not_hold_up_others() -> None:
    grammars = FakeGrammars()
    h = Harness(grammars=grammars)
    h.add("slow", range(8))
    h.add("fast", range(100, 108))
    grammars.ready.add("fast")
    out, _ = h.step()
    assert list(out.num_scheduled_tokens) == ["fast"]
    assert [r.req_id for r in h.sched.waiting] == ["slow"]
    grammars.ready.add("slow")
    out, _ = h.step()
    assert list(out.num_scheduled_tokens) == ["fast", "slow"]


def test_completed_grammar_stops_the_request_and_state_is_dropped() -> None:
    grammars = FakeGrammars(length=3)
    h = Harness(grammars=grammars)
    h.add("a", range(8), max_tokens=10)
    h.add("b", range(20, 28), max_tokens=10)
    grammars.ready |= {"a", "b"}
    h.step()
    h.sched.abort_requests(["b"])
    while h.sched.num_unfinished:
        h.step()
    assert h.finished["a"].status == RequestStatus.FINISHED_STOPPED
    assert h.finished["a"].num_output_tokens == 3
    assert grammars.accepted["a"] == h.finished["a"].output_token_ids
    assert sorted(grammars.removed) == ["a", "b"]


def test_grammar_masks_are_asked_for_the_sampling_requests_only() -> None:
    grammars = FakeGrammars()
    h = Harness(grammars=grammars, max_num_batched_tokens=10)
    h.add("long", range(16))  # prefilled over two steps: samples only in the second
    h.add("short", range(100, 104))
    grammars.ready |= {"long", "short"}
    masks = []
    for _ in range(3):
        out = h.schedule()
        masks.append(h.sched.grammar_bitmask(out))
        h.update(out, h.sample(out))
    assert masks[0] is None  # nothing samples in a prefill-only step: nothing is asked
    assert grammars.asked == [["long", "short"], ["long", "short"]]
    assert [m.req_ids for m in masks[1:]] == grammars.asked


def test_failed_grammar_aborts_its_request_and_is_reported_once() -> None:
    grammars = FakeGrammars()
    h = Harness(grammars=grammars)
    h.add("bad", range(8))
    h.add("good", range(100, 108))
    grammars.ready.add("good")
    grammars.failed.append("bad")
    out, updates = h.step()
    assert list(out.num_scheduled_tokens) == ["good"]
    assert [(u.req_id, u.finish_reason) for u in updates if u.req_id == "bad"] == [
        ("bad", FinishReason.ABORT)
    ]
    assert "bad" not in h.sched.requests and "bad" in grammars.removed
    _, updates = h.step()
    assert all(u.req_id != "bad" for u in updates)


def test_scheduler_with_only_compiling_requests_waits_for_them() -> None:
    grammars = FakeGrammars()
    h = Harness(grammars=grammars)
    h.add("slow", range(8))
    out = h.schedule()
    assert out.is_empty and grammars.waits == 1
    grammars.ready.add("slow")
    out = h.schedule()
    assert list(out.num_scheduled_tokens) == ["slow"] and grammars.waits == 1


# ---- a step that raises -------------------------------------------------------------------------
def _errors(updates: list[EngineCoreOutput]) -> list[str]:
    return [u.req_id for u in updates if u.finish_reason is FinishReason.ERROR]


def test_named_culprit_ends_with_an_error_and_the_others_rerun() -> None:
    h = Harness()
    bad, good = h.add("bad", range(10)), h.add("good", range(100, 110))
    out = h.schedule()
    assert _errors(h.fail(out, ["bad"])) == ["bad"]
    assert bad.status == RequestStatus.FINISHED_ERROR and "bad" not in h.sched.requests
    assert good.status == RequestStatus.PREEMPTED and good.num_computed_tokens == 0
    assert h.all_blocks_free()
    out, _ = h.step()
    assert out.new_reqs[0].num_computed_tokens == 0  # nothing of the failed step is a hit
    h.run_until_done()
    assert good.status == RequestStatus.FINISHED_LENGTH and good.num_output_tokens == 4
    assert h.all_blocks_free()


def test_blocks_written_in_the_failed_step_leave_the_prefix_cache() -> None:
    h = Harness()
    h.add("a", range(10), max_tokens=4)
    h.fail(h.schedule(), ["a"])
    probe = Request("probe", list(range(10)) + [7], SamplingParams())
    assert h.kv.get_computed_blocks(probe) == []


def test_blocks_written_before_the_failed_step_stay_cached() -> None:
    h = Harness()
    h.add("a", range(10), max_tokens=4)
    h.step()  # the prompt's two full blocks are written
    h.fail(h.schedule(), ["a"])  # a decode step fails
    probe = Request("probe", list(range(10)) + [7], SamplingParams())
    assert len(h.kv.get_computed_blocks(probe)) == 2


def test_unnamed_failure_runs_the_batch_alone_until_the_culprit_fails_by_itself() -> None:
    h = Harness()
    b = [h.add(name, range(ord(name) * 10, ord(name) * 10 + 6), max_tokens=3) for name in "abc"][1]
    out = h.schedule()
    assert h.fail(out, None) == []
    assert [r.req_id for r in h.sched.waiting] == ["a", "b", "c"]
    out, _ = h.step()
    assert list(out.num_scheduled_tokens) == ["a"]  # alone, and it passes
    out = h.schedule()
    assert list(out.num_scheduled_tokens) == ["b"]  # alone, and it fails: the culprit
    assert _errors(h.fail(out, None)) == ["b"]
    out, _ = h.step()
    assert list(out.num_scheduled_tokens) == ["c"]
    out, _ = h.step()
    assert list(out.num_scheduled_tokens) == ["a", "c"]  # no suspects left: batched again
    h.run_until_done()
    assert h.finished["a"].num_output_tokens == h.finished["c"].num_output_tokens == 3
    assert b.status == RequestStatus.FINISHED_ERROR
    assert h.all_blocks_free()


def test_a_lone_request_that_fails_is_the_culprit() -> None:
    h = Harness()
    h.add("only", range(6))
    assert _errors(h.fail(h.schedule(), None)) == ["only"]
    assert h.sched.num_unfinished == 0 and h.all_blocks_free()


def test_a_grammar_that_raises_on_a_token_fails_its_request_only() -> None:
    class Raising(FakeGrammars):
        def accept(self, request: Request, token_id: int) -> bool:
            if request.req_id == "bad":
                raise RuntimeError("matcher rejected a token it had allowed")
            return super().accept(request, token_id)

    grammars = Raising()
    h = Harness(grammars=grammars)
    h.add("bad", range(8))
    h.add("good", range(100, 108))
    grammars.ready |= {"bad", "good"}
    _, updates = h.step()
    assert _errors(updates) == ["bad"]
    h.run_until_done()
    assert h.finished["good"].num_output_tokens == 4
    assert h.all_blocks_free()
