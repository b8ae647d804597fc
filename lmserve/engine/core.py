"""EngineCore: the loop that owns scheduling, KV blocks, the model and sampling.

It sees token ids only; tokenization, stop strings and output assembly belong to the frontend.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec

from lmserve.config import EngineConfig
from lmserve.core.kv_cache_manager import KVCacheManager
from lmserve.core.request import Request, RequestFailed
from lmserve.core.scheduler import Scheduler
from lmserve.engine.messages import EngineCoreOutput, EngineCoreRequest, SchedulerStats
from lmserve.executor.tensor_parallel import ExecutorDied, TensorParallelRunner
from lmserve.kv_events.events import KVEventBatch
from lmserve.kv_events.publisher import ZmqEventPublisher
from lmserve.structured_output.manager import StructuredOutputManager
from lmserve.worker.model_runner import ModelRunner

if TYPE_CHECKING:
    from lmserve.engine.pooling_core import PoolingEngineCore

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(
        self,
        config: EngineConfig,
        scheduler: Scheduler,
        runner: ModelRunner | TensorParallelRunner,
        structured_output: StructuredOutputManager,
    ) -> None:
        self.config = config
        self.scheduler = scheduler
        self.runner = runner
        self.structured_output = structured_output
        self.sleep_level = 0  # 0: awake
        self.kv_events: ZmqEventPublisher | None = None
        if config.kv_events is not None:
            medium = "GPU" if config.device.startswith("cuda") else "CPU"
            scheduler.kv.enable_events(medium)
            self.kv_events = ZmqEventPublisher(config.kv_events.for_rank(config.data_parallel_rank))

    @classmethod
    def from_config(cls, config: EngineConfig) -> EngineCore:
        """Load the model and allocate the KV cache, then wire the scheduler to its blocks."""
        runner = (
            TensorParallelRunner(config)
            if config.tensor_parallel_size > 1
            else ModelRunner.load(config)
        )
        capacity = (runner.num_blocks - 1) * config.cache.block_size
        max_len, encoder = config.scheduler.max_model_len, config.model.num_encoder_tokens
        if capacity < max_len + encoder:  # an encoder-decoder request holds its cross K/V too
            plus = f" plus {encoder} encoder states" if encoder else ""
            raise ValueError(
                f"the KV cache holds {capacity} tokens, fewer than max_model_len={max_len}{plus}, "
                "so one long request could never run; "
                "lower max_model_len or give the cache more memory (kv_cache_memory_gb, "
                "num_kv_blocks or gpu_memory_utilization)"
            )
        kv = KVCacheManager(
            runner.num_blocks,
            config.cache.block_size,
            config.cache.enable_prefix_caching,
            sliding_window=runner.kv_window,
        )
        grammars = StructuredOutputManager(
            config.structured_output,
            config.model.path,
            config.model.vocab_size,
            config.scheduler.max_num_seqs,
        )
        max_loras = config.lora.max_loras if config.lora else 0
        scheduler = Scheduler(config.scheduler, kv, grammars, max_loras, config.speculative)
        return cls(config, scheduler, runner, grammars)

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request; raises (and holds nothing of it) when it cannot be queued."""
        if self.sleep_level:
            raise ValueError("the engine is asleep: wake it up (wake_up()) before sending requests")
        core_request = Request(
            req_id=request.req_id,
            prompt_token_ids=list(request.prompt_token_ids),
            sampling_params=request.sampling_params,
            eos_token_id=request.eos_token_id,
            arrival_time=request.arrival_time,
            cache_salt=request.cache_salt,
            lora_request=request.lora_request,
            prompt_embeds=request.prompt_embeds,
            encoder_features=request.encoder_features,
            num_encoder_tokens=self.config.model.num_encoder_tokens
            if request.encoder_features is not None
            else 0,
            images=list(request.images),
        )
        self.scheduler.add_request(core_request)
        try:
            self.structured_output.add(core_request)
        except BaseException:
            self.scheduler.abort_requests([request.req_id])
            raise

    def abort_requests(self, req_ids: list[str]) -> None:
        self.scheduler.abort_requests(req_ids)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.runner.images is None:
            return stats
        cache = self.runner.images.encoder_cache
        return msgspec.structs.replace(
            stats, mm_cache_queries=cache.queries, mm_cache_hits=cache.hits
        )

    def step(self) -> list[EngineCoreOutput]:
        """Schedule, run the model, mask by the grammars, sample, and apply the tokens; then
        publish what the step changed in the prefix cache."""
        if not self.has_unfinished_requests():
            return []
        outputs = self._step()
        self._publish_kv_events()
        return outputs

    def _publish_kv_events(self) -> None:
        if self.kv_events is not None:
            events = self.scheduler.kv.take_events()
            if events:
                self.kv_events.publish(KVEventBatch(time.time(), events))

    def _step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        try:
            self.runner.execute(scheduler_output)
            bitmask = self.scheduler.grammar_bitmask(scheduler_output)
            sampled = self.runner.sample(bitmask)
        except ExecutorDied:
            raise
        except RequestFailed as exc:
            logger.exception("requests %s failed; the others go on", exc.req_ids)
            return self.scheduler.fail_step(scheduler_output, exc.req_ids)
        except Exception:  # noqa: BLE001 - the core outlives one bad batch
            logger.exception(
                "a step of %d requests failed; they rerun one at a time to find the cause",
                len(scheduler_output.num_scheduled_tokens),
            )
            return self.scheduler.fail_step(scheduler_output, None)
        return self.scheduler.update_from_output(scheduler_output, sampled)

    def check_health(self) -> None:
        """Raise ExecutorDied when a tensor-parallel worker is gone (the engine cannot step)."""
        self.runner.check_health()

    def shutdown(self) -> None:
        self.runner.shutdown()
        self.structured_output.shutdown()
        if self.kv_events is not None:
            self.kv_events.shutdown()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode: level 1 frees the KV cache (on CUDA the weights go to host memory),
        level 2 the weights as well. Only an idle engine sleeps; asleep again is a no-op."""
        if not self.config.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with --enable-sleep-mode")
        if level not in (1, 2):
            raise ValueError(f"the sleep level must be 1 or 2, got {level}")
        if self.has_unfinished_requests():
            raise ValueError(
                f"{self.scheduler.num_unfinished} requests are unfinished: sleep when idle"
            )
        if self.sleep_level:
            return
        self.scheduler.kv.reset_prefix_cache()  # the cached blocks' contents go with the cache
        self._publish_kv_events()
        self.runner.sleep(level)
        self.sleep_level = level

    def wake_up(self) -> None:
        if self.sleep_level:
            self.runner.wake_up()
            self.sleep_level = 0

    def reset_prefix_cache(self) -> None:
        self.scheduler.kv.reset_prefix_cache()
        self._publish_kv_events()

    def check_invariants(self) -> None:
        self.scheduler.kv.check_invariants()
        self.runner.check_invariants()


def build_engine_core(config: EngineConfig) -> EngineCore | PoolingEngineCore:
    """The core for the config's runner: generate, or pooling."""
    if config.runner == "pooling":
        from lmserve.engine.pooling_core import PoolingEngineCore

        return PoolingEngineCore.from_config(config)
    return EngineCore.from_config(config)
