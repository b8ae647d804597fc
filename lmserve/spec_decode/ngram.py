"""Prompt-lookup proposals: pure numpy, run by the scheduler after each step."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NgramProposer:
    """Finds the longest suffix of the sequence (between `min_n` and `max_n` tokens) that
    occurred before, at its latest earlier place, and proposes the tokens that followed it."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` guessed next tokens (none when no suffix of min_n tokens recurs)."""
        length = len(token_ids)
        if k < 1 or length <= self.min_n:
            return []
        window = min(length, 8192)  # bounded work per step on very long sequences
        tokens = np.asarray(token_ids[length - window :], dtype=np.int64)
        last = window - 1
        # candidate earlier ends of a match: where the last token occurred before
        ends = np.flatnonzero(tokens[:last] == tokens[last])
        if len(ends) == 0:
            return []
        matched = np.ones(len(ends), dtype=np.int64)
        alive = np.ones(len(ends), dtype=bool)
        for j in range(1, self.max_n):
            prev = ends - j
            alive &= prev >= 0
            alive[alive] = tokens[prev[alive]] == tokens[last - j]
            if not alive.any():
                break
            matched += alive
        best = int(matched.max())
        if best < self.min_n:
            return []
        end = int(ends[np.flatnonzero(matched == best)[-1]])  # the latest of the longest
        return tokens[end + 1 : end + 1 + k].tolist()
