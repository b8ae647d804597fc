"""--kv-events-config as vLLM reads it."""

from __future__ import annotations

import pytest

from lmserve.engine.args import create_engine_config
from lmserve.kv_events.config import KVEventsConfig, parse_kv_events_config


def test_vllms_defaults_and_forms(tiny_model_dirs) -> None:
    assert parse_kv_events_config(None) is None
    assert parse_kv_events_config({"enable_kv_cache_events": False, "publisher": "zmq"}) is None
    assert parse_kv_events_config({"enable_kv_cache_events": True, "publisher": "null"}) is None
    on = parse_kv_events_config({"enable_kv_cache_events": True})  # zmq when enabled
    assert on == KVEventsConfig()
    assert (on.endpoint, on.replay_endpoint, on.buffer_steps, on.topic) == (
        "tcp://*:5557", None, 10_000, "")  # fmt: skip
    seed = '{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events"}'
    config = create_engine_config(str(tiny_model_dirs["llama"]), kv_events_config=seed)
    assert config.kv_events == KVEventsConfig(topic="kv-events")


def test_data_parallel_cores_take_the_next_ports() -> None:
    config = KVEventsConfig(endpoint="tcp://*:5557", replay_endpoint="tcp://*:5600")
    second = config.for_rank(1)
    assert (second.endpoint, second.replay_endpoint) == ("tcp://*:5558", "tcp://*:5601")
    assert config.for_rank(0) is config


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"enable_kv_cache_events": True, "publisher": "kafka"}, "'zmq' or 'null'"),
        ({"enable_kv_cache_events": True, "port": 1}, "unknown keys"),
        ({"enable_kv_cache_events": True, "buffer_steps": 0}, "at least 1"),
        ("{not json", "not JSON"),
    ],
)
def test_refusals_say_why(tiny_model_dirs, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_engine_config(str(tiny_model_dirs["llama"]), kv_events_config=value)
