"""Image embeddings kept by content hash, so an image is encoded once however its prompt is
split into chunks, preempted and resumed, or sent again (vLLM's encoder cache, on the worker).

An entry a request still needs (its prompt has not yet run past the image) is never evicted;
the others go oldest first once the cache holds more rows than its budget.
"""

from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, budget_rows: int) -> None:
        self.budget_rows = budget_rows
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._users: dict[str, set[str]] = {}  # image hash -> requests that still need it
        self.num_encoded = 0  # images encoded so far
        self.queries = 0  # images requests came to need (again after a preemption)

    def __contains__(self, image_hash: str) -> bool:
        return image_hash in self._entries

    @property
    def num_rows(self) -> int:
        return sum(entry.shape[0] for entry in self._entries.values())

    @property
    def hits(self) -> int:
        """Needs met without running the encoder (an image is only encoded while needed)."""
        return self.queries - self.num_encoded

    def get(self, image_hash: str) -> torch.Tensor:
        self._entries.move_to_end(image_hash)
        return self._entries[image_hash]

    def put(self, image_hash: str, rows: torch.Tensor) -> None:
        """An image just encoded; the cache is then trimmed to its budget."""
        self._entries[image_hash] = rows
        self.num_encoded += 1
        self._evict()

    def hold(self, req_id: str, image_hash: str) -> None:
        """`req_id` needs the image until release(): it is not evicted meanwhile."""
        self.queries += 1
        self._users.setdefault(image_hash, set()).add(req_id)

    def release(self, req_id: str, image_hash: str) -> None:
        users = self._users.get(image_hash)
        if users is not None:
            users.discard(req_id)
            if not users:
                del self._users[image_hash]
        self._evict()

    @property
    def holders(self) -> set[str]:
        """Requests that hold an image."""
        return set().union(*self._users.values())

    def _evict(self) -> None:
        excess = self.num_rows - self.budget_rows
        for image_hash in list(self._entries):
            if excess <= 0:
                return
            if image_hash not in self._users:
                excess -= self._entries.pop(image_hash).shape[0]
