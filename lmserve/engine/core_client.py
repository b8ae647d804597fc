"""The engine core in its own process, spoken to over ZMQ with msgspec-encoded messages.

The core process owns the model, scheduler and KV blocks and runs `EngineCore.step()` whenever it
has work; the API process keeps tokenization, detokenization and HTTP, so neither competes with
the other for the GIL. Each way, messages are one tagged union of msgspec Structs
(`engine/messages.py`): `ToCore` (a request, abort, stats, sleep, wake_up, shutdown) and
`FromCore` (ready, outputs, stats, done, error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import zmq
import zmq.asyncio

from lmserve.config import EngineConfig
from lmserve.engine.messages import (
    Abort,
    ControlDone,
    CoreFailed,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
    FromCore,
    GetStats,
    Outputs,
    Ready,
    ResetPrefixCache,
    SchedulerStats,
    Shutdown,
    Sleep,
    Stats,
    ToCore,
    WakeUp,
)
from lmserve.engine.protocol import EngineDeadError

if TYPE_CHECKING:  # the API process never loads the model code, only the core process does
    from lmserve.engine.core import EngineCore
    from lmserve.engine.pooling_core import PoolingEngineCore

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Entry point of the core process: load, report ready, then serve until told to stop."""
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ToCore)
    try:
        from lmserve.engine.core import build_engine_core

        if config.data_parallel_size > 1 and config.device == "cpu":
            _take_share_of_cores(config.data_parallel_size)
        core = build_engine_core(config)
        outbox.send(encoder.encode(Ready(core.stats())))
        try:
            _serve(core, inbox, outbox, encoder, decoder, config.data_parallel_rank)
        finally:
            core.shutdown()
    except Exception:  # noqa: BLE001 - whatever kills the core is reported, then it exits
        outbox.send(encoder.encode(CoreFailed(traceback.format_exc())))
    finally:
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()


def _take_share_of_cores(num_engines: int) -> None:
    """One of `num_engines` data-parallel cores on this CPU: an equal share of its cores as
    torch threads, so the engines do not oversubscribe it."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // num_engines))


def _serve(
    core: EngineCore | PoolingEngineCore,
    inbox: zmq.Socket,
    outbox: zmq.Socket,
    encoder: msgspec.msgpack.Encoder,
    decoder: msgspec.msgpack.Decoder[ToCore],
    engine: int = 0,
) -> None:
    parent = os.getppid()
    while True:
        # Wait for input only when idle (checking each second that the server still exists, so
        # the core never outlives it); otherwise drain what has arrived and step.
        timeout = 0 if core.has_unfinished_requests() else _IDLE_POLL_MS
        while inbox.poll(timeout):
            message = decoder.decode(inbox.recv())
            if isinstance(message, Shutdown):
                return
            reply = _handle(core, message, engine)
            if reply is not None:
                outbox.send(encoder.encode(reply))
            timeout = 0
        if os.getppid() != parent:
            logger.warning("the server process is gone; the engine core exits")
            return
        core.check_health()  # a tensor-parallel worker gone: raise, and the core exits failed
        outputs = core.step()
        if outputs:
            outbox.send(encoder.encode(Outputs(outputs, core.stats(), engine)))


def _handle(
    core: EngineCore | PoolingEngineCore, message: ToCore, engine: int = 0
) -> FromCore | None:
    """Apply one message to the core; the reply to send back, if any."""
    match message:
        case EngineCoreRequest():
            try:
                core.add_request(message)
            except ValueError:  # sent while the engine went to sleep: it ends aborted
                aborted = EngineCoreOutput(message.req_id, [], FinishReason.ABORT)
                return Outputs([aborted], core.stats(), engine)
            except Exception:  # noqa: BLE001 - one request that cannot be queued fails alone
                logger.exception("request %s could not be queued", message.req_id)
                failed = EngineCoreOutput(message.req_id, [], FinishReason.ERROR)
                return Outputs([failed], core.stats(), engine)
        case Abort(req_ids=req_ids):
            core.abort_requests(req_ids)
        case GetStats():
            return Stats(core.stats(), engine)
        case Sleep(level=level):
            return _control(lambda: core.sleep(level))
        case WakeUp():
            return _control(core.wake_up)
        case ResetPrefixCache():
            return _control(core.reset_prefix_cache)
    return None


def _control(call: Callable[[], None]) -> ControlDone:
    try:
        call()
    except ValueError as exc:  # refused (busy, sleep mode off): the caller gets the reason
        return ControlDone(str(exc))
    return ControlDone()


class AsyncMPCoreClient:
    """The API process's end: starts the core process and exchanges messages with it."""

    num_engines = 1  # the cores a GetStats, Sleep or WakeUp gets an answer from

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._ctx: zmq.asyncio.Context | None = None
        self._to_core: zmq.asyncio.Socket | None = None
        self._from_core: zmq.asyncio.Socket | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ipc_dir: tempfile.TemporaryDirectory[str] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(FromCore)

    async def start(self, timeout_s: float) -> SchedulerStats:
        """Spawn the core and wait until its model is loaded; returns its first stats."""
        self._ipc_dir = tempfile.TemporaryDirectory(prefix="lmserve-")
        base = os.path.join(self._ipc_dir.name, uuid.uuid4().hex[:8])
        input_addr, output_addr = f"ipc://{base}-in", f"ipc://{base}-out"
        self._ctx = zmq.asyncio.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, 0)  # never block on a burst: queue without bound
        self._to_core.bind(input_addr)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(output_addr)
        spawn = multiprocessing.get_context("spawn")
        self._proc = spawn.Process(
            target=run_engine_core,
            args=(self.config, input_addr, output_addr),
            name="lmserve-engine-core",
            daemon=True,
        )
        self._proc.start()
        try:
            message = await self.receive(timeout_s)
        except TimeoutError:
            await self.shutdown()
            raise TimeoutError(
                f"the engine core did not finish loading within {timeout_s:g} s"
            ) from None
        if not isinstance(message, Ready):
            await self.shutdown()
            reason = message.reason if isinstance(message, CoreFailed) else repr(message)
            raise RuntimeError(f"the engine core failed to start:\n{reason}")
        return message.stats

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def route(self, request: EngineCoreRequest) -> int:
        """The core a request goes to (its metrics' engine label): the one."""
        return 0

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    async def send(self, message: ToCore) -> None:
        """Queue a message for the core; EngineDeadError when there is no core to take it (a
        PUSH socket without a peer would otherwise wait forever)."""
        assert self._to_core is not None, "start() the client first"
        if not self.is_alive:
            raise EngineDeadError(f"the engine core process exited (code {self._exit_code()})")
        try:
            await self._to_core.send(self._encoder.encode(message), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EngineDeadError("the engine core is not connected") from None

    async def receive(self, timeout_s: float | None = None) -> FromCore:
        """The next message from the core; CoreFailed if its process is gone, TimeoutError if
        it went quiet for longer than `timeout_s`."""
        assert self._from_core is not None, "start() the client first"
        # checks the core's process once a second, and the deadline to the millisecond: polls
        # of a whole second let a core that was ready within the first one beat any timeout
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_s = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            if await self._from_core.poll(timeout=int(wait_s * 1000)):
                return self._decoder.decode(await self._from_core.recv())
            if not self.is_alive:
                return CoreFailed(f"the engine core process exited (code {self._exit_code()})")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"the engine core did not answer within {timeout_s:g} s")

    def _exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.exitcode

    async def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has; close sockets."""
        if self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(asyncio.TimeoutError, zmq.ZMQError, EngineDeadError):
                await asyncio.wait_for(self.send(Shutdown()), timeout=1.0)
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
        for sock in (self._to_core, self._from_core):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
        if self._ipc_dir is not None:
            self._ipc_dir.cleanup()
        self._ctx = self._to_core = self._from_core = None
        self._ipc_dir = None
