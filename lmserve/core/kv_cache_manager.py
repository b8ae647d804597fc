"""THE owner of KV blocks: which blocks each request holds, prefix-cache hits, and freeing.

With a sliding window on every layer, blocks that have fallen out of the window of a request's
next query go back to the pool while it runs (keeping their prefix hashes until reused), so a
long request holds about window / block_size blocks; its list keeps the null block in their
place, so block indices still match positions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from lmserve.core.block_pool import ROOT_HASH, BlockPool, KVBlock, hash_block
from lmserve.core.request import Request
from lmserve.kv_events.events import BlockStored, KVCacheEvent


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks, enable_caching)
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # an encoder-decoder request's cross-attention K/V: held from its start until it ends
        # (or is preempted), never prefix-cached
        self._cross_blocks: dict[str, list[KVBlock]] = {}
        self._num_published: dict[str, int] = {}  # leading blocks of a request already cached
        self._num_dropped: dict[str, int] = {}  # leading blocks given back, out of the window

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (0..1)."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_usable_blocks

    def block_ids(self, req_id: str, start: int = 0) -> list[int]:
        """The request's block ids from its `start`-th block on."""
        return [b.block_id for b in self._req_blocks.get(req_id, ())[start:]]

    def cross_block_ids(self, req_id: str) -> list[int]:
        """The blocks holding the request's encoder states' K/V (none: a decoder-only request)."""
        return [b.block_id for b in self._cross_blocks.get(req_id, ())]

    def num_blocks(self, req_id: str) -> int:
        return len(self._req_blocks.get(req_id, ()))

    def get_computed_blocks(self, request: Request) -> list[KVBlock]:
        """The longest run of cached full blocks that prefixes the request. Pure: takes no refs.

        The last token is never a hit, since it must run through the model to be sampled from;
        requests that want prompt logprobs take no hits, since hit positions produce no logits.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        self._update_block_hashes(request, max_hit_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
        num_lookahead: int = 0,
    ) -> bool:
        """Hold enough blocks for the request's computed tokens, its hits and `num_new_tokens`,
        and `num_lookahead` slots past them (where a draft model writes its guesses' KV).

        Returns False and changes nothing when the pool is short; the caller preempts or waits.
        Blocks that will be full after this step are published to the prefix cache right away, so
        a later request in the same step can hit them: KV is stored for the whole batch before
        attention reads it, layer by layer.
        """
        held = self._req_blocks.get(request.req_id, [])
        self._drop_out_of_window(request, held)
        num_tokens = (
            request.num_computed_tokens
            + len(new_computed_blocks) * self.block_size
            + num_new_tokens
        )
        # a speculative step also writes its guesses' KV: blocks are held for them, but only
        # known tokens are published (num_tokens counts no guesses)
        num_known = min(num_tokens, request.num_tokens)
        num_new_blocks = (
            cdiv(num_tokens + num_lookahead, self.block_size) - len(held) - len(new_computed_blocks)
        )
        num_cross = 0
        if request.num_encoder_tokens and request.req_id not in self._cross_blocks:
            num_cross = cdiv(request.num_encoder_tokens, self.block_size)
        if num_new_blocks <= 0 and not new_computed_blocks and not num_cross:
            self._publish_full_blocks(request, num_known)  # most decode steps: room already held
            return True
        # Hits with no holder sit in the free queue: taking them uses up free blocks too.
        num_idle_hits = sum(block.ref_cnt == 0 for block in new_computed_blocks)
        if max(num_new_blocks, 0) + num_idle_hits + num_cross > self.pool.num_free_blocks:
            return False
        if num_cross:
            self._cross_blocks[request.req_id] = self.pool.take_new_blocks(num_cross)
        self.pool.touch(new_computed_blocks)
        held = self._req_blocks.setdefault(request.req_id, held)
        held.extend(new_computed_blocks)
        if num_new_blocks > 0:
            held.extend(self.pool.take_new_blocks(num_new_blocks))
        self._publish_full_blocks(request, num_known)
        return True

    def free(self, request: Request, num_written: int | None = None) -> None:
        """Release every block the request holds, tail first so shared prefixes stay cached.

        `num_written`: the tokens whose KV is known to be in the cache, when a failed step may
        have left the rest half written; blocks past them leave the prefix cache, so no later
        request can hit them.
        """
        if num_written is None and request.req_id in self._req_blocks:
            # a speculative step's accepted guesses filled blocks no allocation has published
            self._publish_full_blocks(request, min(request.num_computed_tokens, request.num_tokens))
        blocks = self._req_blocks.pop(request.req_id, [])
        self._num_published.pop(request.req_id, None)
        dropped = self._num_dropped.pop(request.req_id, 0)
        if num_written is not None:
            self.pool.uncache(blocks[max(dropped, num_written // self.block_size) :])
        self.pool.release(reversed(blocks[dropped:]))
        self.pool.release(self._cross_blocks.pop(request.req_id, []))

    def _drop_out_of_window(self, request: Request, held: list[KVBlock]) -> None:
        """Give back the blocks before the window of the request's next query (position
        num_computed_tokens, which sees keys from num_computed_tokens - window + 1 on)."""
        if self.sliding_window is None:
            return
        first_seen = request.num_computed_tokens - self.sliding_window + 1
        num_out = min(max(first_seen, 0) // self.block_size, len(held))
        start = self._num_dropped.get(request.req_id, 0)
        if num_out <= start:
            return
        out = held[start:num_out]
        held[start:num_out] = [self.pool.null_block] * (num_out - start)
        self._num_dropped[request.req_id] = num_out
        self.pool.release(out)

    def enable_events(self, medium: str) -> None:
        """Record the cache's changes as KV events (`medium`: where the blocks live)."""
        self.pool.events, self.pool.medium = [], medium

    def take_events(self) -> list[KVCacheEvent]:
        """The events since the last take (none unless enabled)."""
        events = self.pool.events
        if not events:
            return []
        self.pool.events = []
        return events

    def reset_prefix_cache(self) -> None:
        self.pool.reset_prefix_cache()
        self._num_published = dict.fromkeys(self._num_published, 0)

    def _publish_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_caching:
            return
        num_full = num_tokens // self.block_size
        start = self._num_published.get(request.req_id, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_full)
        blocks = self._req_blocks[request.req_id]
        first = max(start, self._num_dropped.get(request.req_id, 0))
        stored = [
            i
            for i in range(first, num_full)
            if self.pool.cache_block(blocks[i], request.block_hashes[i])
        ]
        self._num_published[request.req_id] = num_full
        if stored and self.pool.events is not None:
            self._record_stored(request, stored)

    def _record_stored(self, request: Request, stored: list[int]) -> None:
        """One BlockStored per run of consecutive blocks this request just published."""
        size, hashes = self.block_size, request.block_hashes
        lora = request.lora_request.lora_int_id if request.lora_request else None
        runs: list[list[int]] = []
        for i in stored:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        assert self.pool.events is not None
        for run in runs:
            self.pool.events.append(
                BlockStored(
                    block_hashes=[hashes[i] for i in run],
                    parent_block_hash=hashes[run[0] - 1] if run[0] else None,
                    token_ids=request.all_token_ids[run[0] * size : (run[-1] + 1) * size],
                    block_size=size,
                    lora_id=lora,
                    medium=self.pool.medium,
                )
            )

    def _update_block_hashes(self, request: Request, num_blocks: int) -> None:
        """Extend the request's hash chain to `num_blocks` full blocks (salted at the root, and
        where images are)."""
        hashes = request.block_hashes
        size = self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            salt = request.block_salt(i, size)
            hashes.append(
                hash_block(parent, request.all_token_ids[i * size : (i + 1) * size], salt)
            )

    def check_invariants(self) -> None:
        """Pool invariants, and every block's ref count equals the requests holding it."""
        self.pool.check_invariants()
        held = [
            *(blocks[self._num_dropped.get(r, 0) :] for r, blocks in self._req_blocks.items()),
            *self._cross_blocks.values(),
        ]
        holders = Counter(b.block_id for blocks in held for b in blocks)
        for block in self.pool.blocks[1:]:
            assert block.ref_cnt == holders[block.block_id], (
                f"block {block.block_id}: ref_cnt {block.ref_cnt} != {holders[block.block_id]} holders"
            )
        for req_id, blocks in self._req_blocks.items():
            dropped = self._num_dropped.get(req_id, 0)
            assert all(b is self.pool.null_block for b in blocks[:dropped])
            live = blocks[dropped:]
            assert len({b.block_id for b in live}) == len(live), "request holds a block twice"
        for req_id, blocks in self._cross_blocks.items():
            assert not {b.block_id for b in blocks} & set(self.block_ids(req_id)), (
                f"request {req_id} holds a block as self and cross K/V"
            )
