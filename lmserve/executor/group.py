"""What every tensor-parallel rank does alike: join the ranks' process group, take its share of
the CPU, and read the step messages rank 0 sends."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lmserve.core.scheduler_output import SchedulerOutput
from lmserve.layers.shm_all_reduce import SharedMemoryAllReduce
from lmserve.layers.tensor_parallel import TensorParallel

# how long a rank waits for the others, to meet and then in any one collective (loading a large
# checkpoint happens between meeting and the first collective)
GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Step:
    """One step for the other ranks: the scheduler's output, and the tokens rank 0 sampled in
    the step before (their logits went to rank 0, so they learn the tokens from it)."""

    scheduler_output: SchedulerOutput
    sampled: dict[str, list[int]]
    # rank 0's requests after the step before (tokens, computed tokens), when the engine
    # checks its invariants: every rank's batch must hold the same
    batch_state: dict[str, tuple[int, int]] | None = None


@dataclass(frozen=True)
class Stop:
    """The engine is shutting down: leave the loop."""


def join_group(
    rank: int, size: int, store_path: str, shm_path: str, device: str, alive: Callable[[], bool]
) -> TensorParallel:
    """Meet the other ranks through a file they all see (gloo on CPU), map the shared memory
    their all-reduces go through, and, on a CPU, take an equal share of its cores as torch
    threads. `alive`: False once a rank is known gone (waits for it then fail)."""
    if device != "cpu":
        raise ValueError("tensor parallelism runs on CPU (gloo) only for now")
    # torch's threads (OMP_NUM_THREADS where set, as Ray sets it from the CPUs a replica
    # reserves; else the cores) shared between the ranks
    torch.set_num_threads(max(1, torch.get_num_threads() // size))
    store = dist.FileStore(store_path, size)
    group: Any = dist.ProcessGroupGloo(store, rank, size, GROUP_TIMEOUT)
    shm = SharedMemoryAllReduce(shm_path, rank, size, alive)
    return TensorParallel(rank, size, group, shm)
