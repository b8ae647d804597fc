"""Speculative decoding's draft model: after each step it catches up on the tokens the step made
known and guesses each request's next tokens greedily, one batched forward per guess.

Its KV lives in its own cache addressed by the target's block tables (the same block ids), so
the scheduler's allocation covers both: it holds `num_speculative_tokens` blocks' worth of
lookahead slots for the guesses' KV. The draft guesses greedily (as vLLM's proposers do), so the
target checks one-hot guesses and its output keeps the target's distribution exactly."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from lmserve.attention.backend import AttentionBackend, CommonAttentionMetadata, get_backend, ranks
from lmserve.config import EngineConfig
from lmserve.forward_context import set_forward_context
from lmserve.models.loader import load_model, torch_dtype
from lmserve.transfer import to_device, to_host
from lmserve.worker.input_batch import InputBatch
from lmserve.worker.kv_cache import allocate_kv_caches, bytes_per_block
from lmserve.worker.sleep_mode import put_to_sleep, wake_weights

logger = logging.getLogger(__name__)


class DraftRunner:
    def __init__(
        self, config: EngineConfig, model: nn.Module, num_blocks: int, device: torch.device
    ) -> None:
        assert config.draft is not None and config.speculative is not None
        self.config = config.draft.model
        self.num_guesses = config.speculative.num_speculative_tokens
        self.max_model_len = config.scheduler.max_model_len
        self.block_size = config.cache.block_size
        self.device = device
        self.backend: AttentionBackend = get_backend(config.draft.attention_backend, device)
        self.dtype = torch_dtype(self.config.dtype)
        self.num_blocks = num_blocks
        self.model = model
        self.kv_caches: list[torch.Tensor] = []
        self._allocate()
        # per input-batch row: the leading tokens whose draft KV holds the real tokens
        self.num_valid = np.zeros(config.scheduler.max_num_seqs, dtype=np.int64)

    @staticmethod
    def load_model(config: EngineConfig, device: torch.device) -> nn.Module:
        """The draft's weights (before the KV cache is sized, so a GPU profile counts them)."""
        assert config.draft is not None
        torch.manual_seed(config.draft.model.seed)
        return load_model(config.draft.model, device)

    @staticmethod
    def bytes_per_block(config: EngineConfig) -> int:
        """What one block of the draft's KV costs (it shares the target's blocks)."""
        assert config.draft is not None
        draft = config.draft.model
        return bytes_per_block(draft, config.cache.block_size, torch_dtype(draft.dtype))

    def _allocate(self) -> None:
        shape = self.backend.kv_cache_shape(
            self.num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim
        )
        self.kv_caches = allocate_kv_caches(
            self.config, shape, self.block_size, self.dtype, self.device
        )
        for layer, cache in zip(self.model.attention_layers(), self.kv_caches, strict=True):
            layer.kv_cache = cache

    def sleep(self, level: int) -> None:
        """As the target's runner: the KV cache goes; level 2 frees the weights too."""
        put_to_sleep(self.model, level, self.device)
        self.kv_caches = []

    def wake_up(self) -> None:
        self.model = wake_weights(self.model, self.config, self.device)
        self._allocate()

    def add(self, row: int, num_computed_tokens: int) -> None:
        """A request (re)joins at `row`: its cached prefix's draft KV was written with it."""
        self.num_valid[row] = num_computed_tokens

    def propose(
        self, batch: InputBatch, rows: np.ndarray, sampled: np.ndarray, wants: np.ndarray
    ) -> dict[int, list[int]]:
        """Catch up on each of the step's `rows` (to its last token where it `sampled`, else to
        its computed prompt), then guess for the rows that `wants`: up to num_guesses tokens
        each, fewer where the request's length limit or its held blocks end first."""
        num_tokens = batch.num_tokens[rows]
        # positions whose KV can be written: the blocks the request holds
        room = np.minimum(batch.num_blocks[rows] * self.block_size, self.max_model_len)
        ends = np.minimum(np.where(sampled, num_tokens, batch.num_computed_tokens[rows]), room)
        starts = np.minimum(self.num_valid[rows], ends)
        # guesses' inputs sit at num_tokens - 1 (the last token) ... num_tokens + k - 2
        limit = np.minimum(room - num_tokens + 1, self.max_model_len - num_tokens - 1)
        ks = np.where(
            sampled & wants & (ends == num_tokens), np.minimum(limit, self.num_guesses), 0
        )
        ks = np.maximum(ks, 0)
        self.num_valid[rows] = ends
        busy = ends > starts
        if not busy.any():
            return {}
        guesses = self._catch_up(batch, rows[busy], starts[busy], ends[busy], ks[busy] > 0)
        proposals = {
            int(r): [int(g)] for r, g in zip(rows[busy][ks[busy] > 0], guesses, strict=True)
        }
        k_of = dict(zip(rows[busy].tolist(), ks[busy].tolist(), strict=True))
        for step in range(1, self.num_guesses):
            going = np.fromiter((r for r in proposals if k_of[r] > step), np.int64)
            if not len(going):
                break
            last = np.fromiter((proposals[int(r)][-1] for r in going), np.int64, len(going))
            positions = batch.num_tokens[going] + step - 1
            guesses = self._decode(batch, going, last, positions)
            for r, g in zip(going.tolist(), guesses, strict=True):
                proposals[r].append(int(g))
        return proposals

    def _catch_up(
        self,
        batch: InputBatch,
        rows: np.ndarray,
        starts: np.ndarray,
        ends: np.ndarray,
        guess: np.ndarray,
    ) -> list[int]:
        """One forward over each row's tokens starts..ends; the greedy next token of each row
        that `guess`es."""
        lens = ends - starts
        token_rows = np.repeat(rows, lens)
        positions = np.repeat(starts, lens) + ranks(lens)
        logits_at = (np.cumsum(lens) - 1)[guess]
        return self._run(
            batch, rows, batch.token_ids[token_rows, positions], positions, lens, logits_at
        )

    def _decode(
        self, batch: InputBatch, rows: np.ndarray, token_ids: np.ndarray, positions: np.ndarray
    ) -> list[int]:
        lens = np.ones(len(rows), dtype=np.int64)
        return self._run(batch, rows, token_ids, positions, lens, np.arange(len(rows)))

    @torch.inference_mode()
    def _run(
        self,
        batch: InputBatch,
        rows: np.ndarray,
        token_ids: np.ndarray,
        positions: np.ndarray,
        lens: np.ndarray,
        logits_at: np.ndarray,
    ) -> list[int]:
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start_loc[1:])
        token_rows = np.repeat(rows, lens)
        block_ids = batch.block_table[token_rows, positions // self.block_size].astype(np.int64)
        common = CommonAttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=positions[query_start_loc[1:] - 1] + 1,
            block_table=batch.block_table[rows],
            slot_mapping=to_device(
                block_ids * self.block_size + positions % self.block_size, self.device
            ),
            block_size=self.block_size,
        )
        with set_forward_context(self.backend.build_metadata(common), None):
            hidden = self.model(
                to_device(token_ids, self.device), to_device(positions, self.device)
            )
        if not len(logits_at):
            return []
        logits = self.model.compute_logits(hidden[to_device(logits_at, self.device)])
        (guesses,) = to_host(logits.argmax(dim=-1))
        return guesses.tolist()
