"""KV blocks, their reference counts, the free LRU queue, and the prefix-hash -> block map.

Only `KVCacheManager` calls into the pool; it is the one place block state changes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from lmserve.kv_events.events import AllBlocksCleared, BlockRemoved, KVCacheEvent

# The hash of the (empty) prefix before a request's first block.
ROOT_HASH = b"lmserve-prefix-root"


def hash_block(parent: bytes, token_ids: Sequence[int], salt: str | None = None) -> bytes:
    """Chain a full block's tokens onto its prefix; sha256 so distinct prefixes never collide."""
    digest = hashlib.sha256(parent)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if salt:
        digest.update(salt.encode())
    return digest.digest()


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set once the block is full and cached


class BlockPool:
    """Fixed set of blocks. Block 0 is the null block: never handed out, always zero in the cache,
    so padded block tables point somewhere harmless.

    Free blocks sit in LRU order; a freed block keeps its hash (a possible future cache hit) until
    it is handed out again, at which point its hash is evicted.
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        self._free: OrderedDict[int, KVBlock] = OrderedDict(
            (b.block_id, b) for b in self.blocks[1:]
        )
        self._cached: dict[bytes, KVBlock] = {}
        # KV events, when a publisher wants them: changes to the cache since the last take
        self.events: list[KVCacheEvent] | None = None
        self.medium: str | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        """Pure lookup; does not take a reference."""
        return self._cached.get(block_hash)

    def take_new_blocks(self, num: int) -> list[KVBlock]:
        """Pop `num` least-recently-freed blocks with ref_cnt 1. Requires num <= num_free_blocks."""
        if num > len(self._free):
            raise RuntimeError(f"asked for {num} blocks, only {len(self._free)} free")
        taken = []
        for _ in range(num):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache hits, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference each; blocks reaching zero go to the back of the free queue in the
        order given (callers pass a request's tail first, so shared prefixes are evicted last)."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_block(self, block: KVBlock, block_hash: bytes) -> bool:
        """Publish a full block under its prefix hash (first writer wins on duplicates);
        whether it was."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def uncache(self, blocks: Iterable[KVBlock]) -> None:
        """Take blocks out of the prefix cache (their contents cannot be trusted)."""
        for block in blocks:
            self._evict(block)

    def reset_prefix_cache(self) -> None:
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        if self.events is not None:
            self.events.append(AllBlocksCleared())

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
                if self.events is not None:
                    self.events.append(BlockRemoved([block.block_hash], self.medium))
            block.block_hash = None

    def check_invariants(self) -> None:
        """Free queue = exactly the blocks with ref_cnt 0; cache map and block hashes agree."""
        assert self.null_block.ref_cnt >= 1 and 0 not in self._free
        for block in self.blocks[1:]:
            assert block.ref_cnt >= 0, f"block {block.block_id} ref_cnt {block.ref_cnt}"
            assert (block.ref_cnt == 0) == (block.block_id in self._free), (
                f"block {block.block_id}: ref_cnt {block.ref_cnt}, "
                f"in free queue {block.block_id in self._free}"
            )
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash
        assert sum(b.block_hash is not None for b in self.blocks) == len(self._cached)
