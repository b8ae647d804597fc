"""The events and their batch, as msgspec structs that encode exactly as vLLM's do (array-like,
tagged by class name), so a subscriber written for vLLM decodes them unchanged."""

from __future__ import annotations

from typing import Any

import msgspec


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """One change to the prefix cache."""


class BlockStored(KVCacheEvent):
    """Full blocks published under their hashes (a chain: each block's parent is the one
    before it, the first's is `parent_block_hash`)."""

    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(KVCacheEvent):
    """Blocks no longer found under their hashes (reused for other tokens, or untrusted)."""

    block_hashes: list[bytes]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    """The whole prefix cache was forgotten (reset_prefix_cache, sleep)."""


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The events of one engine step, stamped with the wall clock."""

    ts: float
    events: list[Any]
