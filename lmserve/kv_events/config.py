"""vLLM's --kv-events-config: whether and where the engine core publishes its KV-cache
events."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_KEYS = {
    "enable_kv_cache_events",
    "publisher",
    "endpoint",
    "replay_endpoint",
    "buffer_steps",
    "hwm",
    "max_queue_size",
    "topic",
}


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's fields and defaults: a ZMQ PUB socket at `endpoint` sends [topic, sequence
    number, batch]; a ROUTER at `replay_endpoint` (when set) resends the last `buffer_steps`
    batches from a sequence number a subscriber asks for."""

    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def for_rank(self, rank: int) -> KVEventsConfig:
        """A data-parallel core's own ports: tcp ports moved up by its rank, as vLLM does."""
        if rank == 0:
            return self
        replay = self.replay_endpoint
        return dataclasses.replace(
            self,
            endpoint=_offset(self.endpoint, rank),
            replay_endpoint=None if replay is None else _offset(replay, rank),
        )


def _offset(endpoint: str, rank: int) -> str:
    if not endpoint.startswith("tcp://"):
        return f"{endpoint}-{rank}"
    host, port = endpoint.rsplit(":", 1)
    return f"{host}:{int(port) + rank}"


def parse_kv_events_config(value: dict[str, Any] | None) -> KVEventsConfig | None:
    """None unless `enable_kv_cache_events` is true and the publisher is zmq (vLLM's "null"
    publisher drops events)."""
    if value is None:
        return None
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ValueError(f"kv_events_config has unknown keys {unknown}; known: {sorted(_KEYS)}")
    enabled = bool(value.get("enable_kv_cache_events", False))
    publisher = value.get("publisher") or ("zmq" if enabled else "null")
    if publisher not in ("zmq", "null"):
        raise ValueError(f"kv_events_config publisher must be 'zmq' or 'null', got {publisher!r}")
    if not enabled or publisher == "null":
        return None
    defaults = KVEventsConfig()
    config = KVEventsConfig(
        endpoint=str(value.get("endpoint") or defaults.endpoint),
        replay_endpoint=value.get("replay_endpoint"),
        buffer_steps=int(value.get("buffer_steps", defaults.buffer_steps)),
        hwm=int(value.get("hwm", defaults.hwm)),
        max_queue_size=int(value.get("max_queue_size", defaults.max_queue_size)),
        topic=str(value.get("topic", defaults.topic)),
    )
    if config.buffer_steps < 1 or config.max_queue_size < 1:
        raise ValueError("kv_events_config buffer_steps and max_queue_size must be at least 1")
    return config
