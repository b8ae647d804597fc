"""KV events end to end: an engine publishing over ZMQ, read by a subscriber written as
vLLM's example is (its own copies of the event types, msgspec's decoder, a SUB socket and a
REQ socket for replays): stored blocks with their tokens and hash chain, blocks removed when
reused, the cache cleared, sequence numbers without gaps, a replay of missed batches, and a
served model's request seen the same way."""

from __future__ import annotations

import time
from typing import Any

import httpx
import msgspec
import pytest
import zmq

from lmserve import LLM, SamplingParams
from tests.api.conftest import free_port, start_server, stop_server
from tests.engine.test_llm import random_prompts

ExternalBlockHash = bytes | int


# The subscriber's types, as vLLM's example declares them
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[ExternalBlockHash]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class Subscriber:
    def __init__(self, port: int, replay_port: int | None = None, topic: str = "kv-events"):
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(f"tcp://127.0.0.1:{port}")
        self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.replay = None
        if replay_port is not None:
            self.replay = self.ctx.socket(zmq.REQ)
            self.replay.connect(f"tcp://127.0.0.1:{replay_port}")
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.seqs: list[int] = []
        time.sleep(0.5)  # a PUB socket drops what it sends before the SUB has joined

    def events(self, until, timeout_s: float = 10) -> list:
        """Events received until `until(events)` holds."""
        events: list = []
        deadline = time.monotonic() + timeout_s
        while not until(events):
            assert time.monotonic() < deadline, events
            if self.sub.poll(100):
                _, seq, payload = self.sub.recv_multipart()
                self.seqs.append(int.from_bytes(seq, "big"))
                events += self.decoder.decode(payload).events
        return events

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def stored_chain(events: list) -> tuple[list[bytes], list[int]]:
    """The hashes and tokens of the stored blocks, checking each event chains onto the last."""
    hashes: list[bytes] = []
    tokens: list[int] = []
    for event in events:
        if isinstance(event, BlockStored):
            assert event.parent_block_hash == (hashes[-1] if hashes else None)
            assert len(event.token_ids) == len(event.block_hashes) * event.block_size
            hashes += event.block_hashes
            tokens += event.token_ids
    return hashes, tokens


@pytest.fixture
def ports() -> tuple[int, int]:
    return free_port(), free_port()


def test_stored_removed_cleared_and_replayed(tiny_model_dirs, ports) -> None:
    port, replay_port = ports
    config = {
        "enable_kv_cache_events": True, "publisher": "zmq", "topic": "kv-events",
        "endpoint": f"tcp://127.0.0.1:{port}", "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
    }  # fmt: skip
    llm = LLM(str(tiny_model_dirs["llama"]), kv_events_config=config, block_size=16,
              num_kv_blocks=24, max_model_len=128)  # fmt: skip
    subscriber = Subscriber(port, replay_port)
    try:
        prompt = random_prompts([40], seed=11)[0]
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        sequence = prompt + out.outputs[0].token_ids  # 70 tokens: 4 full blocks
        events = subscriber.events(lambda e: len(stored_chain(e)[0]) >= 4)
        hashes, tokens = stored_chain(events)
        assert tokens == sequence[:64]
        assert all(
            e.block_size == 16 and e.lora_id is None and e.medium == "CPU"
            for e in events
            if isinstance(e, BlockStored)
        )
        # other prompts take the free blocks, the oldest cached ones among them
        others = random_prompts([60] * 6, seed=12)
        llm.generate([{"prompt_token_ids": p} for p in others], params, use_tqdm=False)
        removed = subscriber.events(
            lambda e: any(isinstance(x, BlockRemoved) and x.block_hashes[0] in hashes for x in e)
        )
        assert all(x.medium == "CPU" for x in removed if isinstance(x, BlockRemoved))
        llm.reset_prefix_cache()
        subscriber.events(lambda e: any(isinstance(x, AllBlocksCleared) for x in e))
        assert subscriber.seqs == list(range(len(subscriber.seqs)))  # no gap
        # a subscriber that missed batches asks for them from a sequence number
        subscriber.replay.send((0).to_bytes(8, "big"))
        seq, payload = subscriber.replay.recv_multipart()
        assert int.from_bytes(seq, "big") == 0
        replayed = stored_chain(subscriber.decoder.decode(payload).events)[1]
        assert replayed and replayed == sequence[: len(replayed)]  # the first batch again
    finally:
        subscriber.close()
        llm.engine_core.shutdown()


def test_a_taken_endpoint_is_refused_with_what_to_do(tiny_model_dirs, ports) -> None:
    busy = zmq.Context.instance().socket(zmq.PUB)
    busy.bind(f"tcp://127.0.0.1:{ports[0]}")
    try:
        config = {"enable_kv_cache_events": True, "endpoint": f"tcp://127.0.0.1:{ports[0]}"}
        with pytest.raises(ValueError, match="pick a free endpoint"):
            LLM(str(tiny_model_dirs["llama"]), kv_events_config=config, kv_cache_memory_gb=0.01)
    finally:
        busy.close(linger=0)


def test_a_served_requests_blocks_reach_the_subscriber(tiny_model_dirs, ports) -> None:
    import openai

    port = ports[0]
    config = (
        '{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events", '
        f'"endpoint": "tcp://127.0.0.1:{port}"}}'
    )
    server = start_server(str(tiny_model_dirs["llama"]), "--served-model-name", "tiny",
                          "--kv-cache-memory-gb", "0.02", "--kv-events-config", config,
                          "--enable-prompt-tokens-details",
                          env={"VLLM_SERVER_DEV_MODE": "1"})  # fmt: skip
    subscriber = Subscriber(port)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        prompt = random_prompts([50], seed=13)[0]
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
        events = subscriber.events(lambda e: len(stored_chain(e)[0]) >= 3)
        assert stored_chain(events)[1][:48] == prompt[:48]

        def cached() -> int:
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
            return reply.usage.prompt_tokens_details.cached_tokens

        assert cached() == 48  # the blocks the events named are hits
        # vLLM's dev route: the whole cache goes, in one event, and nothing hits after it
        assert httpx.post(f"{server.url}/reset_prefix_cache").status_code == 200
        subscriber.events(lambda e: any(isinstance(x, AllBlocksCleared) for x in e))
        assert cached() == 0
    finally:
        subscriber.close()
        stop_server(server)
