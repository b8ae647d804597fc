"""Publishes KV-event batches from the engine core over ZMQ, in a thread of its own so a slow
or absent subscriber never holds up a step."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque

import msgspec
import zmq

from lmserve.kv_events.config import KVEventsConfig
from lmserve.kv_events.events import KVEventBatch

logger = logging.getLogger(__name__)

_END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


class ZmqEventPublisher:
    """PUB socket at `endpoint`: each batch as [topic, 8-byte big-endian sequence number,
    msgpack payload]. With `replay_endpoint`, a ROUTER answers a subscriber's REQ of a sequence
    number with every buffered batch from it on, then an empty payload (vLLM's protocol)."""

    def __init__(self, config: KVEventsConfig) -> None:
        self.config = config
        self._queue: queue.Queue[KVEventBatch | None] = queue.Queue(config.max_queue_size)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="lmserve-kv-events", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise ValueError(
                f"kv_events_config cannot bind {config.endpoint}"
                f"{' / ' + config.replay_endpoint if config.replay_endpoint else ''}: "
                f"{self._error}; pick a free endpoint"
            ) from self._error

    def publish(self, batch: KVEventBatch) -> None:
        """Queue a batch; when the queue is full the batch is dropped (subscribers see a gap
        in the sequence numbers and can ask for a replay)."""
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1:
                logger.warning("KV events are published slower than they come: dropping some")

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        ctx = zmq.Context()
        pub = ctx.socket(zmq.PUB)
        replay = None
        try:
            pub.setsockopt(zmq.SNDHWM, self.config.hwm)
            pub.bind(self.config.endpoint)
            if self.config.replay_endpoint is not None:
                replay = ctx.socket(zmq.ROUTER)
                replay.bind(self.config.replay_endpoint)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            pub.close(linger=0)
            ctx.term()
            return
        self._ready.set()
        encoder = msgspec.msgpack.Encoder()
        topic = self.config.topic.encode()
        buffer: deque[tuple[int, bytes]] = deque(maxlen=self.config.buffer_steps)
        seq = 0
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._replay(replay, buffer)
                try:
                    batch = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                payload = encoder.encode(batch)
                pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
                buffer.append((seq, payload))
                seq += 1
        finally:
            pub.close(linger=100)
            if replay is not None:
                replay.close(linger=0)
            ctx.term()

    @staticmethod
    def _replay(replay: zmq.Socket, buffer: deque[tuple[int, bytes]]) -> None:
        client, _, start = replay.recv_multipart()
        first = int.from_bytes(start, "big")
        for seq, payload in buffer:
            if seq >= first:
                replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        replay.send_multipart((client, b"", _END_OF_REPLAY, b""))
