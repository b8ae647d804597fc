"""The n-gram proposer against a plain-Python statement of the rule, and its corner cases."""

from __future__ import annotations

import random

from lmserve.spec_decode.ngram import NgramProposer


def reference(tokens: list[int], min_n: int, max_n: int, k: int) -> list[int]:
    """The longest suffix of min_n..max_n tokens seen before; its latest earlier place."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_proposes_what_followed_the_suffix() -> None:
    proposer = NgramProposer(min_n=2, max_n=3)
    tokens = [7, 1, 2, 3, 4, 5, 9, 1, 2]
    assert proposer.propose(tokens, 3) == [3, 4, 5]
    assert proposer.propose(tokens, 1) == [3]
    assert proposer.propose(tokens, 0) == []


def test_the_longest_match_wins_over_a_later_shorter_one() -> None:
    proposer = NgramProposer(min_n=1, max_n=3)
    # "5 6" occurs at the start followed by 10; "6" alone occurs later followed by 20
    tokens = [5, 6, 10, 11, 6, 20, 5, 6]
    assert proposer.propose(tokens, 2) == [10, 11]


def test_the_latest_of_equally_long_matches_wins() -> None:
    proposer = NgramProposer(min_n=2, max_n=2)
    tokens = [1, 2, 30, 1, 2, 40, 1, 2]
    assert proposer.propose(tokens, 1) == [40]


def test_no_match_shorter_than_min_n() -> None:
    proposer = NgramProposer(min_n=3, max_n=4)
    assert proposer.propose([1, 2, 9, 8, 1, 2], 3) == []  # only a 2-token match
    assert proposer.propose([1, 2, 3], 3) == []  # nothing earlier at all
    assert proposer.propose([4], 3) == []


def test_a_repeating_run_proposes_its_continuation() -> None:
    """Overlapping matches: a token repeated proposes more of it, up to the sequence's end."""
    proposer = NgramProposer(min_n=2, max_n=4)
    assert proposer.propose([3, 3, 3, 3, 3], 4) == [3]  # the latest match ends one before
    assert proposer.propose([1, 2, 1, 2, 1, 2], 4) == [1, 2]


def test_matches_the_reference_on_random_sequences() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        min_n = rng.randrange(1, 4)
        max_n = min_n + rng.randrange(0, 4)
        k = rng.randrange(1, 6)
        proposer = NgramProposer(min_n, max_n)
        assert proposer.propose(tokens, k) == reference(tokens, min_n, max_n, k), (
            tokens,
            min_n,
            max_n,
            k,
        )
