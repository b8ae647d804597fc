"""KVCacheManager: slot allocation, prefix-cache hits, publishing and freeing."""

from __future__ import annotations

import pytest

from lmserve.core.kv_cache_manager import KVCacheManager
from lmserve.core.request import Request
from lmserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(
    req_id: str, token_ids: list[int], cache_salt: str | None = None, **params
) -> Request:
    return Request(req_id, list(token_ids), SamplingParams(**params), cache_salt=cache_salt)


def make_manager(num_blocks: int = 16, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching=enable_caching)


def prefill(kv: KVCacheManager, request: Request) -> None:
    """Admit a request the way the scheduler does: hits first, then the rest in one chunk."""
    hits = kv.get_computed_blocks(request)
    num_computed = len(hits) * kv.block_size
    assert kv.allocate_slots(request, request.num_tokens - num_computed, hits)
    request.num_computed_tokens = request.num_tokens
    kv.check_invariants()


# ---- allocate_slots -----------------------------------------------------------------------------
@pytest.mark.parametrize(("num_tokens", "num_blocks"), [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_allocate_reserves_ceil_tokens_over_block_size(num_tokens: int, num_blocks: int) -> None:
    kv = make_manager()
    request = make_request("a", range(num_tokens))
    assert kv.allocate_slots(request, num_tokens)
    assert len(kv.block_ids("a")) == num_blocks
    assert kv.num_free_blocks == 15 - num_blocks
    assert 0 not in kv.block_ids("a")
    kv.check_invariants()


def test_allocate_grows_only_when_a_block_fills() -> None:
    kv = make_manager()
    request = make_request("a", range(6))
    assert kv.allocate_slots(request, 6)
    first = kv.block_ids("a")
    assert len(first) == 2
    request.num_computed_tokens = 6
    for _ in range(2):  # tokens 7 and 8 fit in block 2
        request.append_output_token(1)
        assert kv.allocate_slots(request, 1)
        request.num_computed_tokens += 1
        assert kv.block_ids("a") == first
    request.append_output_token(1)
    assert kv.allocate_slots(request, 1)  # token 9 needs a third block
    assert kv.block_ids("a")[:2] == first and len(kv.block_ids("a")) == 3
    kv.check_invariants()


def test_allocate_returns_false_and_changes_nothing_when_short() -> None:
    kv = make_manager(num_blocks=4)  # 3 usable
    a = make_request("a", range(8))
    assert kv.allocate_slots(a, 8)
    assert kv.num_free_blocks == 1
    b = make_request("b", range(100, 108))
    assert not kv.allocate_slots(b, 8)
    assert kv.num_free_blocks == 1
    assert kv.block_ids("b") == []
    assert len(kv.block_ids("a")) == 2
    kv.check_invariants()
    # The same request fits once enough is free.
    kv.free(a)
    assert kv.allocate_slots(b, 8)
    kv.check_invariants()


def test_allocate_counts_idle_hits_against_free_blocks() -> None:
    kv = make_manager(num_blocks=4)  # 3 usable
    a = make_request("a", range(9))
    prefill(kv, a)  # 3 blocks, 2 full ones published
    kv.free(a)
    assert kv.num_free_blocks == 3

    # Shares a's 2 full blocks, needs 2 more: 4 free blocks needed, 3 exist.
    b = make_request("b", list(range(8)) + [50] * 8)
    hits = kv.get_computed_blocks(b)
    assert len(hits) == 2
    assert not kv.allocate_slots(b, 8, hits)
    assert kv.num_free_blocks == 3
    assert [blk.ref_cnt for blk in hits] == [0, 0]
    assert kv.get_computed_blocks(b) == hits  # still cached
    kv.check_invariants()

    # Needs only 1 more: the 2 idle hits + 1 new block fit exactly.
    c = make_request("c", list(range(8)) + [60] * 4)
    hits = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 4, hits)
    assert kv.num_free_blocks == 0
    assert kv.block_ids("c")[:2] == [blk.block_id for blk in hits]
    kv.check_invariants()


def test_usage() -> None:
    kv = make_manager(num_blocks=5)  # 4 usable
    assert kv.usage == 0.0
    assert kv.allocate_slots(make_request("a", range(8)), 8)
    assert kv.usage == pytest.approx(0.5)


# ---- get_computed_blocks ------------------------------------------------------------------------
def test_prefix_hit_on_earlier_request() -> None:
    kv = make_manager()
    a = make_request("a", range(10))
    prefill(kv, a)
    b = make_request("b", range(10))
    hits = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == kv.block_ids("a")[:2]
    assert all(blk.ref_cnt == 1 for blk in hits)  # pure: no reference taken
    kv.check_invariants()


def test_prefix_hit_survives_free() -> None:
    kv = make_manager()
    a = make_request("a", range(10))
    prefill(kv, a)
    a_blocks = kv.block_ids("a")
    kv.free(a)
    assert kv.num_free_blocks == 15
    b = make_request("b", range(10))
    hits = kv.get_computed_blocks(b)
    assert [blk.block_id for blk in hits] == a_blocks[:2]
    assert all(blk.ref_cnt == 0 for blk in hits)
    prefill(kv, b)
    assert kv.block_ids("b")[:2] == a_blocks[:2]
    assert kv.num_free_blocks == 12


def test_hit_never_covers_the_last_token() -> None:
    kv = make_manager()
    a = make_request("a", range(8))  # exactly 2 full blocks
    prefill(kv, a)
    b = make_request("b", range(8))
    assert len(kv.get_computed_blocks(b)) == 1
    # One more token and both full blocks may hit.
    c = make_request("c", range(9))
    assert len(kv.get_computed_blocks(c)) == 2


def test_single_block_prompt_never_hits() -> None:
    kv = make_manager()
    prefill(kv, make_request("a", range(4)))
    assert kv.get_computed_blocks(make_request("b", range(4))) == []


def test_no_hits_without_caching() -> None:
    kv = make_manager(enable_caching=False)
    a = make_request("a", range(10))
    prefill(kv, a)
    assert kv.get_computed_blocks(make_request("b", range(10))) == []
    assert all(blk.block_hash is None for blk in kv.pool.blocks)
    kv.free(a)
    assert kv.get_computed_blocks(make_request("c", range(10))) == []
    kv.check_invariants()


def test_no_hits_with_prompt_logprobs() -> None:
    kv = make_manager()
    prefill(kv, make_request("a", range(10)))
    assert kv.get_computed_blocks(make_request("b", range(10), prompt_logprobs=0)) == []
    assert kv.get_computed_blocks(make_request("c", range(10), prompt_logprobs=5)) == []
    assert len(kv.get_computed_blocks(make_request("d", range(10)))) == 2


def test_shared_prefix_with_different_tails_hits_common_full_blocks() -> None:
    kv = make_manager()
    common = list(range(8))
    a = make_request("a", common + [100, 101, 102, 103, 104])
    prefill(kv, a)
    b = make_request("b", common + [200, 201, 202, 203, 204])
    assert [blk.block_id for blk in kv.get_computed_blocks(b)] == kv.block_ids("a")[:2]
    # Diverging inside block 2: only block 1 is common.
    c = make_request("c", common[:6] + [300, 301, 302, 303, 304])
    assert [blk.block_id for blk in kv.get_computed_blocks(c)] == kv.block_ids("a")[:1]


def test_hits_require_the_whole_prefix_chain() -> None:
    kv = make_manager()
    prefill(kv, make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: the chain differs, no hit at all.
    b = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(b) == []


def test_hits_stop_at_the_first_missing_block() -> None:
    kv = make_manager(num_blocks=5)  # 4 usable
    a = make_request("a", range(9))
    prefill(kv, a)
    _, b2, _ = (kv.pool.blocks[i] for i in kv.block_ids("a"))
    kv.free(a)  # free queue: 4, b3, b2, b1
    # Reorder by hand (the manager never evicts a head before its tail): b1 ahead of b2.
    kv.pool.touch([b2])
    kv.pool.release([b2])  # free queue: 4, b3, b1, b2
    assert kv.allocate_slots(make_request("other", range(500, 511)), 11)  # takes 4, b3, b1
    assert kv.pool.get_cached_block(a.block_hashes[0]) is None
    assert kv.pool.get_cached_block(a.block_hashes[1]) is b2
    assert kv.get_computed_blocks(make_request("probe", range(9))) == []
    kv.check_invariants()


def test_cache_salt_isolates_requests() -> None:
    kv = make_manager()
    prefill(kv, make_request("a", range(10), cache_salt="tenant-a"))
    assert kv.get_computed_blocks(make_request("b", range(10))) == []
    assert kv.get_computed_blocks(make_request("c", range(10), cache_salt="tenant-b")) == []
    assert len(kv.get_computed_blocks(make_request("d", range(10), cache_salt="tenant-a"))) == 2
    # And an unsalted prefix is not visible to salted requests.
    prefill(kv, make_request("e", range(100, 110)))
    assert kv.get_computed_blocks(make_request("f", range(100, 110), cache_salt="x")) == []


def test_blocks_are_published_as_chunks_fill_them() -> None:
    kv = make_manager()
    a = make_request("a", range(12))
    assert kv.allocate_slots(a, 5)  # chunk 1: tokens 0..4, one full block
    probe = make_request("probe", range(12))
    assert len(kv.get_computed_blocks(probe)) == 1
    a.num_computed_tokens = 5
    assert kv.allocate_slots(a, 7)  # chunk 2: the rest, three full blocks
    a.num_computed_tokens = 12
    assert len(kv.get_computed_blocks(make_request("probe2", range(12)))) == 2
    assert len(kv.get_computed_blocks(make_request("probe3", range(13)))) == 3
    kv.check_invariants()


def test_decode_blocks_are_published_once_full() -> None:
    kv = make_manager()
    a = make_request("a", range(6))
    prefill(kv, a)
    for token in (6, 7):  # fill block 2 with the two outputs
        a.append_output_token(token)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert len(kv.get_computed_blocks(make_request("b", range(9)))) == 2


def test_reset_prefix_cache_drops_hits_then_republishes() -> None:
    kv = make_manager()
    a = make_request("a", range(10))
    prefill(kv, a)
    kv.reset_prefix_cache()
    kv.check_invariants()
    assert kv.get_computed_blocks(make_request("b", range(10))) == []
    # The next allocation for the running request publishes its full blocks again.
    a.append_output_token(10)
    assert kv.allocate_slots(a, 1)
    kv.check_invariants()
    assert [blk.block_id for blk in kv.get_computed_blocks(make_request("c", range(10)))] == (
        kv.block_ids("a")[:2]
    )


# ---- free ---------------------------------------------------------------------------------------
def test_free_releases_everything() -> None:
    kv = make_manager()
    a = make_request("a", range(10))
    prefill(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 15
    assert kv.block_ids("a") == []
    kv.check_invariants()
    kv.free(a)  # freeing twice is harmless
    assert kv.num_free_blocks == 15
    kv.check_invariants()


def test_free_with_shared_blocks() -> None:
    kv = make_manager()
    a = make_request("a", range(10))
    prefill(kv, a)
    b = make_request("b", list(range(8)) + [77, 78, 79])
    prefill(kv, b)
    shared = kv.block_ids("a")[:2]
    assert kv.block_ids("b")[:2] == shared
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    assert kv.num_free_blocks == 15 - 4  # a: 3 blocks, b: 1 private block

    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    assert kv.num_free_blocks == 15 - 3
    kv.check_invariants()

    kv.free(b)
    assert [kv.pool.blocks[i].ref_cnt for i in shared] == [0, 0]
    assert kv.num_free_blocks == 15
    kv.check_invariants()


def test_free_releases_tail_first_so_prefix_stays_cached() -> None:
    kv = make_manager(num_blocks=5)  # 4 usable
    a = make_request("a", range(12))
    prefill(kv, a)  # blocks 1, 2, 3 (all full, all published); free queue: 4
    kv.free(a)  # free queue: 4, 3, 2, 1
    # A new request takes 2 blocks: block 4 and a's tail block 3.
    other = make_request("other", range(500, 508))
    assert kv.allocate_slots(other, 8)
    assert kv.block_ids("other") == [4, 3]
    # a's first two blocks are still cached.
    again = make_request("again", range(12))
    assert [blk.block_id for blk in kv.get_computed_blocks(again)] == [1, 2]
    kv.check_invariants()


def test_check_invariants_catches_ref_cnt_not_matching_holders() -> None:
    kv = make_manager()
    prefill(kv, make_request("a", range(10)))
    block_id = kv.block_ids("a")[0]
    kv.pool.touch([kv.pool.blocks[block_id]])  # a reference nobody holds
    with pytest.raises(AssertionError):
        kv.check_invariants()


# ---- sliding window -----------------------------------------------------------------------------
def test_blocks_out_of_every_layers_window_go_back_while_the_request_runs() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, sliding_window=6)
    request = make_request("a", range(10))
    prefill(kv, request)
    assert len(kv.block_ids("a")) == 3 and kv.num_free_blocks == 12
    held = []
    for _ in range(20):  # decode: the query at position p sees keys p - 5 .. p
        request.append_output_token(1)
        assert kv.allocate_slots(request, 1)
        first_seen = request.num_computed_tokens - 5
        ids = kv.block_ids("a")
        assert all(b == 0 for b in ids[: first_seen // BLOCK_SIZE])  # null in their place
        assert 0 not in ids[first_seen // BLOCK_SIZE :]  # every block still seen is held
        held.append(15 - kv.num_free_blocks)
        request.num_computed_tokens += 1
        kv.check_invariants()
    assert max(held) == 3  # 6 keys + the new one span at most 3 blocks of 4
    kv.free(request)
    kv.check_invariants()
    assert kv.num_free_blocks == 15


def test_blocks_given_back_stay_cached_for_a_later_prefix_hit() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, sliding_window=4)
    request = make_request("a", range(13))
    prefill(kv, request)
    request.append_output_token(1)
    assert kv.allocate_slots(request, 1)  # blocks 0 and 1 fall out of the window
    assert kv.block_ids("a")[:2] == [0, 0]
    again = make_request("b", range(13))
    assert len(kv.get_computed_blocks(again)) == 3  # the given-back blocks still hit
    prefill(kv, again)
    kv.free(request)
    kv.free(again)
    kv.check_invariants()
    assert kv.num_free_blocks == 15


def test_a_failed_step_uncaches_held_blocks_and_never_the_null_block() -> None:
    kv = KVCacheManager(16, BLOCK_SIZE, sliding_window=4)
    request = make_request("a", range(13))
    prefill(kv, request)
    request.append_output_token(1)
    assert kv.allocate_slots(request, 1)  # blocks 0 and 1 given back, intact
    kv.free(request, num_written=5)  # held blocks from 1 on are untrusted: 2 and 3
    kv.check_invariants()
    assert kv.num_free_blocks == 15 and kv.pool.null_block.block_hash is None
    assert len(kv.get_computed_blocks(make_request("b", range(13)))) == 2
