"""Tensor parallelism as the engine core sees it: the model runner's interface over N ranks.

Rank 0 runs in the core's process; ranks 1..N-1 are worker processes it starts and owns
(`executor/worker.py`). Each step's scheduler output is pickled once and sent to every worker
with the tokens rank 0 sampled in the step before; then all ranks run the step together, meeting
in each layer's collectives, and rank 0 samples from the logits gathered to it. A worker that
dies stops the engine: its collectives fail at once, and a watcher notices an idle engine's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import weakref

import torch
import zmq
from torch import nn

from lmserve.config import EngineConfig
from lmserve.core.scheduler_output import GrammarBitmask, SampledTokens, SchedulerOutput
from lmserve.executor.group import GROUP_TIMEOUT, Step, Stop, join_group
from lmserve.layers.shm_all_reduce import create_shm_file
from lmserve.worker.image_rows import ImageRows
from lmserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5.0


class ExecutorDied(RuntimeError):
    """A tensor-parallel rank is gone or a step failed on one: the engine cannot go on."""


class TensorParallelRunner:
    """The ModelRunner calls the engine core makes, run on `config.tensor_parallel_size` ranks."""

    def __init__(self, config: EngineConfig) -> None:
        size = config.tensor_parallel_size
        self._dir = tempfile.TemporaryDirectory(prefix="lmserve-tp-")
        self._ctx = zmq.Context()
        replies = self._ctx.socket(zmq.PULL)
        replies_addr = f"ipc://{self._dir.name}/replies"
        replies.bind(replies_addr)
        self._steps: list[zmq.Socket] = []
        self._workers: list[subprocess.Popen[bytes]] = []
        self._stopping = threading.Event()
        self._failed = threading.Event()  # set with `failure`, for the all-reduce's waits
        self.failure: str | None = None
        self._sampled: dict[str, list[int]] = {}
        self._batch_state: dict[str, tuple[int, int]] | None = None
        store = os.path.join(self._dir.name, "store")
        # in memory where the host has /dev/shm (a file on disk would be written back)
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else self._dir.name
        shm = os.path.join(shm_dir, f"{os.path.basename(self._dir.name)}-all-reduce")
        create_shm_file(shm, size)
        # rank 0 takes its share of torch's threads in this process (an offline LLM's: the
        # caller's), and gives them back when the ranks stop
        self._finalizer = weakref.finalize(
            self,
            _stop,
            self._workers,
            self._steps,
            self._ctx,
            self._dir,
            self._stopping,
            torch.get_num_threads(),
        )
        try:
            for rank in range(1, size):
                sock = self._ctx.socket(zmq.PUSH)
                addr = f"ipc://{self._dir.name}/steps-{rank}"
                sock.bind(addr)
                self._steps.append(sock)
                self._workers.append(_start_worker(rank, size, store, shm, addr, replies_addr))
                sock.send(pickle.dumps(config))
            threading.Thread(target=self._watch, name="lmserve-tp-watch", daemon=True).start()
            tp = join_group(
                0, size, store, shm, config.device, alive=lambda: not self._failed.is_set()
            )
            self.runner = ModelRunner.load(config, tp)
            self._wait_ready(replies, size - 1)
        except BaseException:
            replies.close(linger=0)
            self.shutdown()
            raise
        finally:
            os.unlink(shm)  # every rank has it mapped, or failed: the name is not needed
        replies.close(linger=0)
        logger.info("tensor parallel: %d ranks ready (worker pids %s)", size, self.worker_pids)

    @property
    def worker_pids(self) -> list[int]:
        return [proc.pid for proc in self._workers]

    def _wait_ready(self, replies: zmq.Socket, count: int) -> None:
        deadline = time.monotonic() + GROUP_TIMEOUT.total_seconds()
        while count:
            if self.failure is not None:
                raise ExecutorDied(self.failure)
            if time.monotonic() > deadline:
                raise TimeoutError("tensor-parallel workers did not finish loading in time")
            if replies.poll(200):
                replies.recv()
                count -= 1

    def _watch(self) -> None:
        """Note the first worker that exits while the engine runs (an idle engine is told by
        check_health(); a running one's collectives fail on their own)."""
        while not self._stopping.is_set():
            for rank, proc in enumerate(self._workers, start=1):
                code = proc.poll()
                if code is not None and not self._stopping.is_set():
                    self.failure = f"tensor-parallel worker rank {rank} exited (code {code})"
                    self._failed.set()
                    logger.error("%s; the engine stops", self.failure)
                    return
            self._stopping.wait(0.2)

    # ---- what the engine core calls ---------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    @property
    def kv_window(self) -> int | None:
        return self.runner.kv_window

    @property
    def images(self) -> ImageRows | None:
        return self.runner.images

    @property
    def model(self) -> nn.Module:
        """Rank 0's share of the model."""
        return self.runner.model

    def execute(self, so: SchedulerOutput) -> None:
        self.check_health()
        step = Step(so, self._sampled, self._batch_state)
        message = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        self._sampled, self._batch_state = {}, None
        try:
            for sock in self._steps:
                sock.send(message, copy=False)
            self.runner.execute(so)
        except Exception as exc:  # the ranks are out of step: nothing can run after this
            raise self._died(exc) from exc

    def sample(self, grammar: GrammarBitmask | None = None) -> dict[str, SampledTokens]:
        try:
            results = self.runner.sample(grammar)
        except Exception as exc:
            raise self._died(exc) from exc
        self._sampled = {req_id: out.token_ids for req_id, out in results.items() if out.token_ids}
        return results

    def _died(self, exc: Exception) -> ExecutorDied:
        time.sleep(0.5)  # let the watcher see a worker that just exited, for the message
        return ExecutorDied(self.failure or f"a tensor-parallel step failed: {exc}")

    def check_health(self) -> None:
        if self.failure is not None:
            raise ExecutorDied(self.failure)

    def check_invariants(self) -> None:
        """Rank 0's, here; the other ranks check with the next step that their batches hold
        what rank 0's holds now (a rank out of step stops, and so the engine)."""
        self.runner.check_invariants()
        self._batch_state = self.runner.batch_state()

    def sleep(self, level: int) -> None:
        raise ValueError("sleep mode is not available with tensor parallelism yet")

    def wake_up(self) -> None:
        raise ValueError("sleep mode is not available with tensor parallelism yet")

    def shutdown(self) -> None:
        """Tell the workers to stop, and make sure they have."""
        self._stopping.set()
        self._finalizer()


def _start_worker(
    rank: int, size: int, store: str, shm: str, steps: str, replies: str
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "lmserve.executor.worker", "--rank", str(rank)]
    command += ["--size", str(size), "--store", store, "--shm", shm]
    command += ["--steps", steps, "--replies", replies]
    # one progress bar for the load: rank 0's (each rank reads the whole checkpoint)
    return subprocess.Popen(command, env={**os.environ, "TQDM_DISABLE": "1"})


def _stop(
    workers: list[subprocess.Popen[bytes]],
    steps: list[zmq.Socket],
    ctx: zmq.Context,
    directory: tempfile.TemporaryDirectory[str],
    stopping: threading.Event,
    threads: int,
) -> None:
    stopping.set()
    torch.set_num_threads(threads)
    stop = pickle.dumps(Stop())
    for sock, proc in zip(steps, workers, strict=False):
        if proc.poll() is None:
            with contextlib.suppress(zmq.Again):  # one that never connected is killed below
                sock.send(stop, flags=zmq.NOBLOCK)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    for proc in workers:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for sock in steps:
        sock.close(linger=0)
    ctx.term()
    directory.cleanup()
