"""The pooling scheduler: whole prompts packed under the budget, a failed batch's requests rerun
alone so only the culprit ends in an error, aborts drop waiting prompts."""

from __future__ import annotations

from lmserve.config import SchedulerConfig
from lmserve.core.pooling_scheduler import PoolingScheduler
from lmserve.core.request import Request
from lmserve.engine.messages import FinishReason, PooledData
from lmserve.sampling_params import SamplingParams


def _scheduler(*lengths: int, budget: int = 10, max_seqs: int = 8) -> PoolingScheduler:
    scheduler = PoolingScheduler(SchedulerConfig(budget, max_seqs, max_model_len=budget))
    for i, n in enumerate(lengths):
        scheduler.add_request(Request(f"r{i}", [1] * n, SamplingParams(max_tokens=None)))
    return scheduler


def _ids(batch) -> list[str]:
    return [r.req_id for r in batch.requests]


def _pooled(batch) -> list[PooledData]:
    return [PooledData(b"\0" * 4, [1]) for _ in batch.requests]


def test_prompts_are_packed_whole_in_arrival_order() -> None:
    scheduler = _scheduler(4, 5, 3, 10, budget=10)
    first = scheduler.schedule()
    assert _ids(first) == ["r0", "r1"]  # r2 would fit, but order is kept
    outputs = scheduler.finish(first, _pooled(first))
    assert [o.finish_reason for o in outputs] == [FinishReason.STOP] * 2
    assert all(o.pooled is not None and o.first_scheduled_time for o in outputs)
    assert _ids(scheduler.schedule()) == ["r2"]
    assert _ids(scheduler.schedule()) == ["r3"] and scheduler.num_unfinished == 0
    assert _ids(_scheduler(1, 1, 1, max_seqs=2).schedule()) == ["r0", "r1"]


def test_a_failed_batch_finds_its_culprit() -> None:
    scheduler = _scheduler(2, 2, 2)
    batch = scheduler.schedule()
    assert scheduler.fail(batch) == [] and scheduler.num_unfinished == 3
    alone = scheduler.schedule()
    assert _ids(alone) == ["r0"]  # a suspect runs alone
    scheduler.finish(alone, _pooled(alone))
    culprit = scheduler.schedule()
    assert _ids(culprit) == ["r1"]
    (failed,) = scheduler.fail(culprit)
    assert failed.req_id == "r1" and failed.finish_reason is FinishReason.ERROR
    assert _ids(scheduler.schedule()) == ["r2"]


def test_aborted_prompts_never_run() -> None:
    scheduler = _scheduler(2, 2, 2)
    scheduler.abort_requests(["r1"])
    assert _ids(scheduler.schedule()) == ["r0", "r2"]
    assert scheduler.stats().num_waiting == 0
