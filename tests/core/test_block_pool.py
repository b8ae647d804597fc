"""BlockPool: ref counts, the LRU free queue, the prefix map, and the chain hash."""

from __future__ import annotations

import pytest

from lmserve.core.block_pool import ROOT_HASH, BlockPool, hash_block


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def h(n: int) -> bytes:
    """A distinct stand-in block hash."""
    return hash_block(ROOT_HASH, [n])


# ---- null block and ref counts ------------------------------------------------------------------
def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(5, enable_caching=True)
    assert pool.num_usable_blocks == 4
    assert pool.num_free_blocks == 4
    assert pool.null_block.block_id == 0 and pool.null_block.ref_cnt == 1

    taken = pool.take_new_blocks(4)
    assert sorted(ids(taken)) == [1, 2, 3, 4]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.take_new_blocks(1)
    pool.check_invariants()

    # Even after everything went round the free queue, block 0 never comes back.
    pool.release(taken)
    assert 0 not in ids(pool.take_new_blocks(4))
    assert pool.null_block.ref_cnt == 1


def test_take_release_touch_ref_counts() -> None:
    pool = BlockPool(6, enable_caching=True)
    a, b = pool.take_new_blocks(2)
    assert (a.ref_cnt, b.ref_cnt) == (1, 1)
    assert pool.num_free_blocks == 3

    pool.touch([a])
    assert a.ref_cnt == 2
    assert pool.num_free_blocks == 3  # a held block is not in the free queue
    pool.check_invariants()

    pool.release([a])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 3  # still held once
    pool.release([a, b])
    assert (a.ref_cnt, b.ref_cnt) == (0, 0)
    assert pool.num_free_blocks == 5
    pool.check_invariants()

    # Touching a free block (a cache hit) pulls it out of the free queue.
    pool.touch([b])
    assert b.ref_cnt == 1 and pool.num_free_blocks == 4
    assert b not in pool.take_new_blocks(4)
    pool.check_invariants()


def test_take_more_than_free_changes_nothing() -> None:
    pool = BlockPool(4, enable_caching=True)
    pool.take_new_blocks(2)
    with pytest.raises(RuntimeError):
        pool.take_new_blocks(2)
    assert pool.num_free_blocks == 1
    pool.check_invariants()


# ---- LRU order ----------------------------------------------------------------------------------
def test_fresh_pool_hands_out_blocks_in_id_order() -> None:
    pool = BlockPool(6, enable_caching=True)
    assert ids(pool.take_new_blocks(3)) == [1, 2, 3]
    assert ids(pool.take_new_blocks(2)) == [4, 5]


def test_freed_block_is_reused_last() -> None:
    pool = BlockPool(5, enable_caching=True)
    first, _ = pool.take_new_blocks(2)  # blocks 1, 2; free queue: 3, 4
    pool.release([first])  # free queue: 3, 4, 1
    assert ids(pool.take_new_blocks(3)) == [3, 4, 1]


def test_free_queue_follows_release_order() -> None:
    pool = BlockPool(5, enable_caching=True)
    b1, b2, b3, b4 = pool.take_new_blocks(4)
    pool.release([b3])
    pool.release([b1])
    pool.release([b4, b2])
    assert ids(pool.take_new_blocks(4)) == [3, 1, 4, 2]


def test_touch_then_release_moves_block_to_the_back() -> None:
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.take_new_blocks(3)
    pool.release(blocks)  # free queue: 1, 2, 3
    pool.touch([blocks[0]])  # a hit on block 1 ...
    pool.release([blocks[0]])  # ... released again: now the most recently freed
    assert ids(pool.take_new_blocks(3)) == [2, 3, 1]


# ---- prefix map ---------------------------------------------------------------------------------
def test_free_cached_block_stays_a_hit_until_handed_out_again() -> None:
    pool = BlockPool(3, enable_caching=True)
    b1, b2 = pool.take_new_blocks(2)
    pool.cache_block(b1, h(1))
    pool.release([b1])
    # Free, but still cached: a later request may hit it.
    assert pool.get_cached_block(h(1)) is b1
    assert b1.block_hash == h(1) and b1.ref_cnt == 0
    pool.check_invariants()

    # Handed out as a fresh block: the hash is evicted.
    (again,) = pool.take_new_blocks(1)
    assert again is b1
    assert b1.block_hash is None
    assert pool.get_cached_block(h(1)) is None
    pool.check_invariants()
    assert b2.ref_cnt == 1


def test_get_cached_block_takes_no_reference() -> None:
    pool = BlockPool(3, enable_caching=True)
    (b,) = pool.take_new_blocks(1)
    pool.cache_block(b, h(1))
    pool.release([b])
    assert pool.get_cached_block(h(1)) is b
    assert b.ref_cnt == 0 and pool.num_free_blocks == 2


def test_cache_block_first_writer_wins() -> None:
    pool = BlockPool(4, enable_caching=True)
    b1, b2 = pool.take_new_blocks(2)
    pool.cache_block(b1, h(1))
    pool.cache_block(b2, h(1))
    assert pool.get_cached_block(h(1)) is b1
    assert b2.block_hash is None
    # A block already published keeps its first hash.
    pool.cache_block(b1, h(2))
    assert b1.block_hash == h(1)
    assert pool.get_cached_block(h(2)) is None
    pool.check_invariants()

    # Evicting the loser must not evict the winner's map entry.
    pool.release([b2])
    pool.take_new_blocks(2)  # block 3, then b2
    assert pool.get_cached_block(h(1)) is b1
    pool.check_invariants()


def test_cache_block_is_a_no_op_without_caching() -> None:
    pool = BlockPool(3, enable_caching=False)
    (b,) = pool.take_new_blocks(1)
    pool.cache_block(b, h(1))
    assert b.block_hash is None
    assert pool.get_cached_block(h(1)) is None
    pool.check_invariants()


def test_reset_prefix_cache() -> None:
    pool = BlockPool(4, enable_caching=True)
    b1, b2 = pool.take_new_blocks(2)
    pool.cache_block(b1, h(1))
    pool.cache_block(b2, h(2))
    pool.release([b2])  # one held, one free: both lose their hash
    pool.reset_prefix_cache()
    assert pool.get_cached_block(h(1)) is None
    assert pool.get_cached_block(h(2)) is None
    assert b1.block_hash is None and b2.block_hash is None
    assert b1.ref_cnt == 1 and pool.num_free_blocks == 2  # ref counts untouched
    pool.check_invariants()
    # The pool is usable for caching again.
    pool.cache_block(b1, h(1))
    assert pool.get_cached_block(h(1)) is b1
    pool.check_invariants()


# ---- check_invariants can fail --------------------------------------------------------------------
def _busy_pool() -> BlockPool:
    pool = BlockPool(5, enable_caching=True)
    b1, b2, _ = pool.take_new_blocks(3)
    pool.cache_block(b1, h(1))
    pool.cache_block(b2, h(2))
    pool.release([b2])
    pool.check_invariants()
    return pool


def test_check_invariants_catches_held_block_marked_free() -> None:
    pool = _busy_pool()
    pool.blocks[1].ref_cnt = 0  # held block with ref 0, but not in the free queue
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_free_block_with_a_reference() -> None:
    pool = _busy_pool()
    pool.blocks[4].ref_cnt = 1  # in the free queue, yet referenced
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_negative_ref_cnt() -> None:
    pool = _busy_pool()
    pool.release([pool.blocks[2]])  # double free
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_hash_map_disagreement() -> None:
    pool = _busy_pool()
    pool.blocks[3].block_hash = h(3)  # a hash the map does not know
    with pytest.raises(AssertionError):
        pool.check_invariants()

    pool = _busy_pool()
    pool.blocks[1].block_hash = h(9)  # map says h(1) -> block 1
    with pytest.raises(AssertionError):
        pool.check_invariants()


def test_check_invariants_catches_released_null_block() -> None:
    pool = _busy_pool()
    pool.release([pool.null_block])
    with pytest.raises(AssertionError):
        pool.check_invariants()


# ---- hash_block ---------------------------------------------------------------------------------
def test_hash_block_is_deterministic() -> None:
    assert hash_block(ROOT_HASH, [1, 2, 3, 4]) == hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert hash_block(ROOT_HASH, (1, 2, 3, 4)) == hash_block(ROOT_HASH, [1, 2, 3, 4])


def test_hash_block_depends_on_parent_tokens_and_salt() -> None:
    base = hash_block(ROOT_HASH, [1, 2, 3, 4])
    other_parent = hash_block(ROOT_HASH, [9, 9, 9, 9])
    assert hash_block(other_parent, [1, 2, 3, 4]) != base
    assert hash_block(ROOT_HASH, [1, 2, 3, 5]) != base
    assert hash_block(ROOT_HASH, [4, 3, 2, 1]) != base  # order matters
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], salt="a") != base
    assert hash_block(ROOT_HASH, [1, 2, 3, 4], salt="a") != hash_block(
        ROOT_HASH, [1, 2, 3, 4], salt="b"
    )
    # Large token ids are not truncated.
    assert hash_block(ROOT_HASH, [2**40]) != hash_block(ROOT_HASH, [0])


def test_hash_chain_carries_first_block_salt_forward() -> None:
    first = hash_block(ROOT_HASH, [1, 2, 3, 4], salt="tenant-a")
    first_plain = hash_block(ROOT_HASH, [1, 2, 3, 4])
    # Same second-block tokens, different chain: different hash.
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(first_plain, [5, 6, 7, 8])
