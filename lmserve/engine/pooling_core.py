"""PoolingEngineCore: the engine core of the pooling runner (`--runner pooling`).

The same loop the generate core runs (add requests, step, abort, report stats), over the
pooling scheduler and runner: prompts in, one pooled tensor out per request.
"""

from __future__ import annotations

import logging

from lmserve.config import EngineConfig
from lmserve.core.pooling_scheduler import PoolingScheduler
from lmserve.core.request import Request
from lmserve.engine.messages import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from lmserve.worker.pooling_runner import PoolingRunner

logger = logging.getLogger(__name__)


class PoolingEngineCore:
    def __init__(self, config: EngineConfig, scheduler: PoolingScheduler, runner: PoolingRunner):
        self.config = config
        self.scheduler = scheduler
        self.runner = runner

    @classmethod
    def from_config(cls, config: EngineConfig) -> PoolingEngineCore:
        return cls(config, PoolingScheduler(config.scheduler), PoolingRunner.load(config))

    def add_request(self, request: EngineCoreRequest) -> None:
        if request.pooling_params is None:
            raise ValueError("this engine runs a pooling model: it pools, it does not generate")
        self.scheduler.add_request(
            Request(
                req_id=request.req_id,
                prompt_token_ids=list(request.prompt_token_ids),
                sampling_params=request.sampling_params,
                arrival_time=request.arrival_time,
                pooling_params=request.pooling_params,
                token_type_ids=request.token_type_ids,
            )
        )

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def step(self) -> list[EngineCoreOutput]:
        if not self.has_unfinished_requests():
            return []
        batch = self.scheduler.schedule()
        try:
            pooled = self.runner.run(batch)
        except Exception:  # noqa: BLE001 - the core outlives one bad batch
            logger.exception("a pooling step of %d requests failed", len(batch.requests))
            return self.scheduler.fail(batch)
        return self.scheduler.finish(batch, pooled)

    def check_health(self) -> None:
        """Nothing to check: the pooling runner runs in this process."""

    def shutdown(self) -> None:
        pass  # nothing runs beside the model

    def sleep(self, level: int = 1) -> None:
        raise ValueError("sleep mode is not supported for pooling models yet")

    def wake_up(self) -> None:
        pass  # never asleep

    def reset_prefix_cache(self) -> None:
        pass  # no KV cache

    def check_invariants(self) -> None:
        pass  # no blocks to check
