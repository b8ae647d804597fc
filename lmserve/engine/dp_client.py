"""Data parallel: several engine cores behind one API server, each its own process with its own
copy of the model and its own KV cache.

The client routes each request when it is sent: to the core that last took a request sharing
the longest start of its prompt (whose prefix cache then holds it), unless that core is much
busier than the least busy one; otherwise to the least busy (fewest unfinished requests routed
to it). A core that dies fails its own requests and leaves the rotation while the others serve;
the engine is dead only when every core is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import OrderedDict

from lmserve.config import EngineConfig
from lmserve.engine.core_client import AsyncMPCoreClient
from lmserve.engine.messages import (
    Abort,
    CoreFailed,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    FromCore,
    Outputs,
    SchedulerStats,
    ToCore,
    merge_stats,
)
from lmserve.engine.protocol import EngineDeadError

logger = logging.getLogger(__name__)

_MAX_PREFIX_BLOCKS = 64  # prompt blocks hashed for routing: a long shared start is enough
_MAX_PREFIXES = 1 << 16  # block hashes remembered (the oldest forgotten first)
_SLACK = 8  # requests by which a prefix's core may exceed the least busy one (or double it)
_NO_STATS = SchedulerStats(0, 0, 0.0, 0, 0, 0, 0, 0)


class DataParallelCoreClient:
    """The same interface as AsyncMPCoreClient, over `data_parallel_size` of them."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        size = config.data_parallel_size
        self._cores = [
            AsyncMPCoreClient(dataclasses.replace(config, data_parallel_rank=rank))
            for rank in range(size)
        ]
        self._alive = [False] * size
        self._load = [0] * size  # unfinished requests routed to each core
        self._engine_of: dict[str, int] = {}
        self._prefixes: OrderedDict[int, int] = OrderedDict()  # prompt block hash -> core
        self._turn = 0  # breaks ties between equally busy cores in turn
        self._inbox: asyncio.Queue[FromCore] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    async def start(self, timeout_s: float) -> SchedulerStats:
        """Start every core at once; all must load."""
        results = await asyncio.gather(
            *(core.start(timeout_s) for core in self._cores), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(c.shutdown() for c in self._cores), return_exceptions=True)
            raise failed[0]
        self._alive = [True] * len(self._cores)
        self._readers = [
            asyncio.create_task(self._read(rank), name=f"lmserve-core-{rank}")
            for rank in range(len(self._cores))
        ]
        return merge_stats([r for r in results if isinstance(r, SchedulerStats)])

    @property
    def num_engines(self) -> int:
        """The cores a GetStats, Sleep or WakeUp gets an answer from: the live ones."""
        return sum(self._alive)

    @property
    def is_alive(self) -> bool:
        return any(
            alive and core.is_alive for alive, core in zip(self._alive, self._cores, strict=True)
        )

    @property
    def pids(self) -> list[int | None]:
        return [core.pid for core in self._cores]

    def route(self, request: EngineCoreRequest) -> int:
        """Pick the core for a request about to be sent, and count it there."""
        live = [rank for rank, alive in enumerate(self._alive) if alive]
        if not live:
            return 0  # sending it will say that the engine is dead
        size = len(self._cores)
        least = min(live, key=lambda r: (self._load[r], (r - self._turn) % size))
        self._turn += 1
        hashes = _prefix_hashes(request, self.config.cache.block_size)
        choice = least
        for block_hash in reversed(hashes):  # the longest known start first
            holder = self._prefixes.get(block_hash)
            if holder is not None and self._alive[holder]:
                if self._load[holder] <= max(2 * self._load[least], self._load[least] + _SLACK):
                    choice = holder
                break
        for block_hash in hashes:
            self._prefixes[block_hash] = choice
            self._prefixes.move_to_end(block_hash)
        while len(self._prefixes) > _MAX_PREFIXES:
            self._prefixes.popitem(last=False)
        self._engine_of[request.req_id] = choice
        self._load[choice] += 1
        return choice

    async def send(self, message: ToCore) -> None:
        """A request to its core (routed now if it was not); aborts to the cores holding their
        requests; anything else to every live core."""
        match message:
            case EngineCoreRequest(req_id=req_id):
                rank = self._engine_of.get(req_id)
                if rank is None or not self._alive[rank]:  # its core died since it was routed
                    self._forget(req_id)
                    rank = self.route(message)
                await self._cores[rank].send(message)
            case Abort(req_ids=req_ids):
                groups: dict[int, list[str]] = {}
                for req_id in req_ids:
                    rank = self._forget(req_id)
                    if rank is not None:
                        groups.setdefault(rank, []).append(req_id)
                for rank, ids in groups.items():
                    if self._alive[rank]:
                        with contextlib.suppress(EngineDeadError):  # its reader reports it
                            await self._cores[rank].send(Abort(ids))
            case _:
                live = [core for core, alive in zip(self._cores, self._alive, strict=True) if alive]
                if not live:
                    raise EngineDeadError("every engine core has exited")
                for core in live:
                    await core.send(message)

    async def receive(self, timeout_s: float | None = None) -> FromCore:
        """The next message from any core."""
        return await asyncio.wait_for(self._inbox.get(), timeout_s)

    async def _read(self, rank: int) -> None:
        core = self._cores[rank]
        while True:
            message = await core.receive()
            if isinstance(message, CoreFailed):
                self._lose(rank, message.reason)
                return
            if isinstance(message, Outputs):
                for out in message.outputs:
                    if out.finish_reason is not None:
                        self._forget(out.req_id)
            self._inbox.put_nowait(message)

    def _forget(self, req_id: str) -> int | None:
        rank = self._engine_of.pop(req_id, None)
        if rank is not None:
            self._load[rank] -= 1
        return rank

    def _lose(self, rank: int, reason: str) -> None:
        """A core died: its requests fail, it leaves the rotation; the last one's death is the
        engine's."""
        self._alive[rank] = False
        failed = [req_id for req_id, r in self._engine_of.items() if r == rank]
        for req_id in failed:
            self._forget(req_id)
        if not any(self._alive):
            self._inbox.put_nowait(CoreFailed(f"every engine core has exited; the last: {reason}"))
            return
        logger.error(
            "engine core %d died (%d requests fail with it); %d cores go on serving: %s",
            rank,
            len(failed),
            sum(self._alive),
            reason,
        )
        outputs = [EngineCoreOutput(req_id, [], FinishReason.ERROR) for req_id in failed]
        self._inbox.put_nowait(Outputs(outputs, _NO_STATS, rank))

    async def shutdown(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        await asyncio.gather(*(core.shutdown() for core in self._cores), return_exceptions=True)


def _prefix_hashes(request: EngineCoreRequest, block_size: int) -> list[int]:
    """A chain of hashes over the prompt's full blocks that a prefix cache could hit (never the
    last token), rooted in what keeps caches apart: the adapter and the cache salt."""
    tokens = request.prompt_token_ids
    lora = request.lora_request.lora_name if request.lora_request else None
    parent = hash((lora, request.cache_salt))
    num_blocks = min((len(tokens) - 1) // block_size, _MAX_PREFIX_BLOCKS)
    hashes = []
    for start in range(0, num_blocks * block_size, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        hashes.append(parent)
    return hashes
