"""The engine core in its own process, spoken to over ZMQ with msgspec-encoded messages.

The core process owns the model, scheduler and KV blocks and runs `EngineCore.step()` whenever it
has work; the API process keeps tokenization, detokenization and HTTP, so neither competes with
the other for the GIL. Messages are `(kind, payload)` tuples:

- to the core: ("add", EngineCoreRequest), ("abort", [req ids]), ("stats", None),
  ("sleep", level), ("wake_up", None), ("shutdown", None)
- from the core: ("ready", SchedulerStats), ("outputs", ([EngineCoreOutput], SchedulerStats)),
  ("stats", SchedulerStats), ("done", error message or "" after sleep / wake_up),
  ("error", message)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import tempfile
import traceback
import uuid
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from lmserve.config import EngineConfig
from lmserve.core.scheduler import SchedulerStats
from lmserve.engine.messages import EngineCoreOutput, EngineCoreRequest
from lmserve.engine.protocol import EngineDeadError

logger = logging.getLogger(__name__)

_IDLE_POLL_MS = 1000
_ToCore = tuple[str, EngineCoreRequest | list[str] | int | None]
FromCore = tuple[str, tuple[list[EngineCoreOutput], SchedulerStats] | SchedulerStats | str]
_PAYLOAD_TYPES: dict[str, Any] = {
    "ready": SchedulerStats,
    "stats": SchedulerStats,
    "done": str,
    "outputs": tuple[list[EngineCoreOutput], SchedulerStats],
    "error": str,
}


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Entry point of the core process: load, report ready, then serve until told to stop."""
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(_ToCore)
    try:
        from lmserve.engine.core import EngineCore

        core = EngineCore.from_config(config)
        outbox.send(encoder.encode(("ready", core.scheduler.stats())))
        try:
            _serve(core, inbox, outbox, encoder, decoder)
        finally:
            core.shutdown()
    except Exception:  # noqa: BLE001 - whatever kills the core is reported, then it exits
        outbox.send(encoder.encode(("error", traceback.format_exc())))
    finally:
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()


def _serve(core: Any, inbox: zmq.Socket, outbox: zmq.Socket, encoder: Any, decoder: Any) -> None:
    parent = os.getppid()
    while True:
        # Wait for input only when idle (checking each second that the server still exists, so
        # the core never outlives it); otherwise drain what has arrived and step.
        timeout = 0 if core.has_unfinished_requests() else _IDLE_POLL_MS
        while inbox.poll(timeout):
            kind, payload = decoder.decode(inbox.recv())
            if kind == "add":
                try:
                    core.add_request(payload)
                except ValueError:  # sent while the engine went to sleep: it ends aborted
                    aborted = [EngineCoreOutput(payload.req_id, [], "abort", None, 0)]
                    outbox.send(encoder.encode(("outputs", (aborted, core.scheduler.stats()))))
            elif kind == "abort":
                core.abort_requests(payload)
            elif kind == "stats":
                outbox.send(encoder.encode(("stats", core.scheduler.stats())))
            elif kind in ("sleep", "wake_up"):
                error = ""
                try:
                    if kind == "sleep":
                        core.sleep(payload)
                    else:
                        core.wake_up()
                except ValueError as exc:
                    error = str(exc)
                outbox.send(encoder.encode(("done", error)))
            elif kind == "shutdown":
                return
            timeout = 0
        if os.getppid() != parent:
            logger.warning("the server process is gone; the engine core exits")
            return
        outputs = core.step()
        if outputs:
            outbox.send(encoder.encode(("outputs", (outputs, core.scheduler.stats()))))


class AsyncMPCoreClient:
    """The API process's end: starts the core process and exchanges messages with it."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._ctx: zmq.asyncio.Context | None = None
        self._to_core: zmq.asyncio.Socket | None = None
        self._from_core: zmq.asyncio.Socket | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._ipc_dir: tempfile.TemporaryDirectory[str] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        self._envelope = msgspec.msgpack.Decoder(tuple[str, msgspec.Raw])
        self._payloads = {k: msgspec.msgpack.Decoder(t) for k, t in _PAYLOAD_TYPES.items()}

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
        kind, payload = await self.receive(timeout_s)
        if kind != "ready":
            await self.shutdown()
            if kind == "timeout":
                raise TimeoutError(f"the engine core did not finish loading within {timeout_s:g} s")
            raise RuntimeError(f"the engine core failed to start:\n{payload}")
        assert isinstance(payload, SchedulerStats)
        return payload

    @property
    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    async def send(
        self, kind: str, payload: EngineCoreRequest | list[str] | int | None = None
    ) -> None:
        """Queue a message for the core; EngineDeadError when there is no core to take it (a
        PUSH socket without a peer would otherwise wait forever)."""
        assert self._to_core is not None, "start() the client first"
        if not self.is_alive:
            raise EngineDeadError(f"the engine core process exited (code {self._exit_code()})")
        try:
            await self._to_core.send(self._encoder.encode((kind, payload)), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EngineDeadError("the engine core is not connected") from None

    async def receive(self, timeout_s: float | None = None) -> FromCore:
        """The next message from the core; ("error", ...) if it died, ("timeout", ...) if it went
        quiet for longer than `timeout_s`."""
        assert self._from_core is not None, "start() the client first"
        waited = 0.0
        while not await self._from_core.poll(timeout=1000):
            waited += 1.0
            if not self.is_alive:
                return ("error", f"the engine core process exited (code {self._exit_code()})")
            if timeout_s is not None and waited >= timeout_s:
                return ("timeout", f"the engine core did not answer within {timeout_s:g} s")
        kind, raw = self._envelope.decode(await self._from_core.recv())
        return kind, self._payloads[kind].decode(raw)

    def _exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.exitcode

    async def shutdown(self) -> None:
        """Ask the core to stop, then make sure it has; close sockets."""
        if self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(asyncio.TimeoutError, zmq.ZMQError, EngineDeadError):
                await asyncio.wait_for(self.send("shutdown"), timeout=1.0)
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
