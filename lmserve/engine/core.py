"""EngineCore: the loop that owns scheduling, KV blocks, the model and sampling.

It sees token ids only; tokenization, stop strings and output assembly belong to the frontend.
"""

from __future__ import annotations

import logging

from lmserve.config import EngineConfig
from lmserve.core.kv_cache_manager import KVCacheManager
from lmserve.core.request import Request
from lmserve.core.scheduler import Scheduler
from lmserve.engine.messages import EngineCoreOutput, EngineCoreRequest
from lmserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.config = config
        self.scheduler = scheduler
        self.runner = runner

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineCore:
        """Load the model and allocate the KV cache, then wire the scheduler to its blocks."""
        runner = ModelRunner.load(config)
        capacity = (runner.num_blocks - 1) * config.cache.block_size
        if capacity < config.scheduler.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len="
                f"{config.scheduler.max_model_len}, so one long request could never run; "
                "lower max_model_len or give the cache more memory (kv_cache_memory_gb, "
                "num_kv_blocks or gpu_memory_utilization)"
            )
        kv = KVCacheManager(
            runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        return cls(config, Scheduler(config.scheduler, kv), runner)

    def add_request(self, request: EngineCoreRequest) -> None:
        self.scheduler.add_request(
            Request(
                req_id=request.req_id,
                prompt_token_ids=list(request.prompt_token_ids),
                sampling_params=request.sampling_params,
                eos_token_id=request.eos_token_id,
                arrival_time=request.arrival_time,
                cache_salt=request.cache_salt,
            )
        )

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def step(self) -> list[EngineCoreOutput]:
        if not self.has_unfinished_requests():
            return []
        scheduler_output = self.scheduler.schedule()
        sampled = self.runner.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, sampled)

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv.reset_prefix_cache()

    def check_invariants(self) -> None:
        self.scheduler.kv.check_invariants()
