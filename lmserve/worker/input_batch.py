"""Per-row host buffers of the requests the worker holds, so each step's inputs are built with a
few vectorized numpy ops instead of per-request Python work."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmserve.core.scheduler_output import NewRequestData
from lmserve.lora.request import LoRARequest
from lmserve.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    params: SamplingParams
    eos_token_id: int | None
    num_prompt_tokens: int
    lora_request: LoRARequest | None = None


class InputBatch:
    """Rows are reused as requests come and go; `rows_of()` maps a step's batch order to rows."""

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        # +1: the token sampled at max_model_len is stored before the request is told to stop.
        self.token_ids = np.zeros((max_num_reqs, max_model_len + 1), dtype=np.int64)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.num_computed_tokens = np.zeros(max_num_reqs, dtype=np.int64)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int64)
        self.temperature = np.zeros(max_num_reqs, dtype=np.float32)
        self.top_k = np.zeros(max_num_reqs, dtype=np.int64)
        self.top_p = np.ones(max_num_reqs, dtype=np.float32)
        self.min_p = np.zeros(max_num_reqs, dtype=np.float32)
        self.lora_id = np.zeros(max_num_reqs, dtype=np.int64)  # 0: the base model
        self.states: list[CachedRequestState | None] = [None] * max_num_reqs
        self.row_of: dict[str, int] = {}
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))

    def add(self, new: NewRequestData) -> None:
        row = self._free_rows.pop()
        self.row_of[new.req_id] = row
        params = new.sampling_params
        self.states[row] = CachedRequestState(
            new.req_id, params, new.eos_token_id, new.num_prompt_tokens, new.lora_request
        )
        self.lora_id[row] = new.lora_request.lora_int_id if new.lora_request else 0
        n = len(new.token_ids)
        self.token_ids[row, :n] = new.token_ids
        self.num_tokens[row] = n
        self.num_computed_tokens[row] = new.num_computed_tokens
        self.num_blocks[row] = 0
        self.append_blocks(row, new.block_ids)
        self.temperature[row] = 0.0 if params.greedy else params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p

    def remove(self, req_id: str) -> None:
        row = self.row_of.pop(req_id, None)
        if row is not None:
            self.states[row] = None
            self._free_rows.append(row)

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        start = self.num_blocks[row]
        self.block_table[row, start : start + len(block_ids)] = block_ids
        self.num_blocks[row] = start + len(block_ids)

    def append_tokens(self, rows: np.ndarray, token_ids: np.ndarray) -> None:
        """One new token for each of `rows` (distinct rows)."""
        self.token_ids[rows, self.num_tokens[rows]] = token_ids
        self.num_tokens[rows] += 1

    def extend_tokens(self, row: int, token_ids: list[int]) -> None:
        """Several new tokens for one row (a speculative step's accepted ones)."""
        start = self.num_tokens[row]
        self.token_ids[row, start : start + len(token_ids)] = token_ids
        self.num_tokens[row] = start + len(token_ids)

    def rows_of(self, req_ids: list[str]) -> np.ndarray:
        return np.fromiter((self.row_of[r] for r in req_ids), dtype=np.int64, count=len(req_ids))

    def state(self, row: int) -> CachedRequestState:
        state = self.states[row]
        assert state is not None, f"row {row} is empty"
        return state

    def output_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, self.state(row).num_prompt_tokens : self.num_tokens[row]]

    def prompt_token_ids(self, row: int) -> np.ndarray:
        return self.token_ids[row, : self.state(row).num_prompt_tokens]
