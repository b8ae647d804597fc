"""The encoder cache: what a request holds is never evicted; past the budget, what nobody holds
goes oldest first; needs met without an encode count as hits."""

from __future__ import annotations

import torch

from lmserve.worker.encoder_cache import EncoderCache


def test_holds_pin_and_the_oldest_unheld_go_first() -> None:
    cache = EncoderCache(budget_rows=20)
    for name in "abc":
        cache.hold(f"req-{name}", name)
        cache.put(name, torch.zeros(8, 4))  # 24 rows, all held: nothing may go
    assert all(name in cache for name in "abc") and cache.num_rows == 24
    cache.release("req-b", "b")  # over budget: b, the only one unheld, goes
    assert "b" not in cache and cache.num_rows == 16
    cache.release("req-a", "a")
    cache.release("req-c", "c")  # 16 rows: within budget, both kept
    assert "a" in cache and "c" in cache
    cache.get("a")  # a is now the most recently used
    cache.hold("req-d", "d")
    cache.put("d", torch.zeros(8, 4))  # 24 rows: c, the oldest unheld, goes
    assert "c" not in cache and "a" in cache and "d" in cache
    cache.hold("req-e", "a")  # a need met from the cache
    assert (cache.queries, cache.num_encoded, cache.hits) == (5, 4, 1)
    assert cache.holders == {"req-d", "req-e"}
