"""The core's wire: every message survives msgpack and decodes to its own type by its tag."""

from __future__ import annotations

import msgspec
import pytest

from lmserve import SamplingParams
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
    SchedulerStats,
    Shutdown,
    Sleep,
    Stats,
    ToCore,
    TokenLogprobs,
    WakeUp,
)
from lmserve.lora.request import LoRARequest

STATS = SchedulerStats(2, 1, 0.25, 30, 40, 3, 100, 64)

TO_CORE = [
    EngineCoreRequest(
        "r-0",
        [1, 2, 3],
        SamplingParams(temperature=0.5, max_tokens=7, stop=["\n"], logprobs=2),
        2,
        12.5,
        cache_salt="salt",
        lora_request=LoRARequest("sql", 1, "/adapters/sql"),
    ),
    Abort(["r-0", "r-1"]),
    GetStats(),
    Sleep(2),
    WakeUp(),
    Shutdown(),
]
FROM_CORE = [
    Ready(STATS),
    Outputs(
        [
            EngineCoreOutput(
                "r-0",
                [5, 6],
                FinishReason.STOP,
                stop_reason=6,
                num_cached_tokens=16,
                first_scheduled_time=3.5,
                logprobs=[TokenLogprobs([5, 9], [-0.1, -2.5], 1)] * 2,
            ),
            EngineCoreOutput("r-1", [], FinishReason.ABORT),
            EngineCoreOutput("r-2", [7]),
        ],
        STATS,
    ),
    Stats(STATS),
    ControlDone(),
    ControlDone("sleep mode is off"),
    CoreFailed("Traceback ..."),
]


@pytest.mark.parametrize("message", TO_CORE, ids=lambda m: type(m).__name__)
def test_to_core_messages_round_trip(message) -> None:
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=ToCore)
    assert type(decoded) is type(message)
    if isinstance(message, EngineCoreRequest):  # SamplingParams is a dataclass: compare fields
        assert msgspec.to_builtins(decoded) == msgspec.to_builtins(message)
    else:
        assert decoded == message


@pytest.mark.parametrize("message", FROM_CORE, ids=lambda m: type(m).__name__)
def test_from_core_messages_round_trip(message) -> None:
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(message), type=FromCore)
    assert decoded == message
    if isinstance(decoded, Outputs):
        assert decoded.outputs[0].finish_reason is FinishReason.STOP


def test_a_message_of_the_other_direction_or_an_unknown_tag_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(Ready(STATS)), type=ToCore)
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"type": "reboot"}), type=ToCore)


def test_finish_reasons_are_the_openai_strings() -> None:
    assert [r.value for r in FinishReason] == ["stop", "length", "abort", "error"]
    assert msgspec.json.encode(FinishReason.LENGTH) == b'"length"'
