"""The runner's image state for vision-language models: which requests still need which images,
their encoded rows (through the encoder cache), and M-RoPE positions for models that place
image rows on a grid.

A step asks for the rows its tokens take (`override`): the images not yet encoded are encoded
then, those of one size together, and a request lets go of an image once its prompt has run
past it, so the cache may evict it (a preempted request that resumes asks again, and usually
finds it still there).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lmserve.config import EngineConfig
from lmserve.core.scheduler_output import NewRequestData
from lmserve.engine.messages import ImageInput
from lmserve.models.loader import torch_dtype
from lmserve.transfer import float32_tensor, to_device
from lmserve.worker.encoder_cache import EncoderCache


class ImageRows:
    def __init__(self, model: nn.Module, config: EngineConfig, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.dtype = torch_dtype(config.model.dtype)
        rows = max(4 * config.scheduler.max_num_batched_tokens, model.image_tokens)
        self.encoder_cache = EncoderCache(rows)
        self._pending: dict[str, list[ImageInput]] = {}  # images a prompt has yet to run past
        # M-RoPE models: each image request's prompt positions [3, prompt len], later offset
        self.mrope = hasattr(model, "rope_positions")
        self._rope: dict[str, tuple[np.ndarray, int]] = {}

    @property
    def holders(self) -> set[str]:
        """Requests that still need an image."""
        return set(self._pending)

    def add(self, new: NewRequestData) -> None:
        if not new.images:
            return
        if self.mrope:
            self._rope[new.req_id] = self.model.rope_positions(new.num_prompt_tokens, new.images)
        pending = [i for i in new.images if i.offset + i.length > new.num_computed_tokens]
        for image in pending:
            self.encoder_cache.hold(new.req_id, image.identifier)
        if pending:
            self._pending[new.req_id] = pending

    def remove(self, req_id: str) -> None:
        self._let_go(req_id, 0)
        self._rope.pop(req_id, None)

    def check_invariants(self, live: set[str]) -> None:
        assert self.holders <= live, self.holders - live
        assert self.encoder_cache.holders == self.holders

    def override(
        self,
        req_ids: list[str],
        query_start_loc: np.ndarray,
        positions: np.ndarray,
        seq_lens: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step's tokens that take image rows, and those rows; then each request lets go
        of the images its prompt has run past."""
        spans = []  # (step token of the span's first position here, image, span range)
        for i, req_id in enumerate(req_ids):
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            first, last = int(positions[start]), int(positions[end - 1]) + 1
            for image in self._pending.get(req_id, ()):
                lo, hi = max(first, image.offset), min(last, image.offset + image.length)
                if lo < hi:
                    spans.append((start + lo - first, image, lo - image.offset, hi - image.offset))
        if not spans:
            return None
        self._encode_missing([image for _, image, _, _ in spans])
        indices, values = [], []
        for at, image, lo, hi in spans:
            rows = self.encoder_cache.get(image.identifier)
            if not image.mask:  # every position of the span is a row
                indices.append(np.arange(at, at + hi - lo))
                values.append(rows[lo:hi])
                continue
            mask = np.frombuffer(image.mask, np.uint8).astype(bool)
            row_of = np.cumsum(mask) - 1
            taken = np.flatnonzero(mask[lo:hi])
            indices.append(at + taken)
            values.append(rows[torch.from_numpy(row_of[lo + taken])])
        for req_id, seq_len in zip(req_ids, seq_lens.tolist(), strict=True):
            self._let_go(req_id, seq_len)
        return to_device(np.concatenate(indices), self.device), torch.cat(values)

    def rope_positions(
        self, req_ids: list[str], query_start_loc: np.ndarray, positions: np.ndarray
    ) -> torch.Tensor:
        """[3, num_tokens] M-RoPE positions: a prompt's from its table, later tokens at their
        index plus the prompt's offset; requests without images at their index throughout."""
        rope = np.broadcast_to(positions, (3, len(positions))).copy()
        for i, req_id in enumerate(req_ids):
            table = self._rope.get(req_id)
            if table is None:
                continue
            prompt, delta = table
            start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
            step = positions[start:end]
            inside = step < prompt.shape[1]
            rope[:, start:end] = np.where(
                inside, prompt[:, np.minimum(step, prompt.shape[1] - 1)], step + delta
            )
        return to_device(rope, self.device)

    def _encode_missing(self, images: list[ImageInput]) -> None:
        """The images not in the encoder cache through the tower, one call per image size."""
        by_shape: dict[tuple[int, ...], dict[str, ImageInput]] = {}
        for image in images:
            if image.identifier not in self.encoder_cache:
                by_shape.setdefault(tuple(image.shape), {})[image.identifier] = image
        for shape, missing in by_shape.items():
            pixels = torch.stack([float32_tensor(i.data, shape) for i in missing.values()])
            encoded = self.model.embed_images(pixels.to(self.device, self.dtype))
            for image_hash, rows in zip(missing, encoded, strict=True):
                self.encoder_cache.put(image_hash, rows)

    def _let_go(self, req_id: str, computed: int) -> None:
        """Release the request's images its prompt has run past (all of them with 0)."""
        images = self._pending.get(req_id)
        if images is None:
            return
        keep = [i for i in images if computed and i.offset + i.length > computed]
        for image in images:
            if image not in keep:
                self.encoder_cache.release(req_id, image.identifier)
        if keep:
            self._pending[req_id] = keep
        else:
            del self._pending[req_id]
