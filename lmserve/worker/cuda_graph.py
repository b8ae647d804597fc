"""CUDA graphs for decode steps: one graph per padded batch size, replayed from static buffers.

A decode step of a small model is mostly kernel-launch overhead on a fast GPU; replaying a
captured graph launches the whole forward at once. Each captured size reads its inputs (token
ids, positions, slot mapping, sequence lengths, block tables) from fixed device buffers; a step
with n requests copies its values into the first n rows and pads up to the next captured size
with rows that store nothing (slot -1) and attend to one key. Sampling stays eager.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lmserve.attention.backend import AttentionBackend, StaticDecodeInputs
from lmserve.forward_context import set_forward_context
from lmserve.transfer import to_device

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8, up to and including max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly on the static buffers (no capture)
    hidden: torch.Tensor | None  # the graph's output buffer [size, hidden_size]


class DecodeGraphs:
    """`capture=False` keeps all the bookkeeping but runs the forward eagerly on the static
    buffers: what a CPU (or a debugging) run can check of a captured step."""

    def __init__(
        self,
        model: nn.Module,
        backend: AttentionBackend,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
        *,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.backend = backend
        self.sizes = capture_sizes(max_num_seqs)
        self.capture_enabled = capture
        rows = self.sizes[-1]
        self.input_ids = torch.zeros(rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, dtype=torch.long, device=device)
        self.static = StaticDecodeInputs(
            query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(rows, dtype=torch.int32, device=device),
            block_table=torch.zeros(rows, max_blocks_per_seq, dtype=torch.int32, device=device),
            slot_mapping=torch.full((rows,), -1, dtype=torch.long, device=device),
        )
        self._captured: dict[int, _Captured] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first so smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # warm-up: Triton compiles outside the capture
            if not self.capture_enabled:
                self._captured[size] = _Captured(None, None)
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            pool = graph.pool()
            self._captured[size] = _Captured(graph, hidden)
        if self.capture_enabled:
            torch.cuda.synchronize()
        logger.info(
            "%s decode graphs for batch sizes %d-%d (%d sizes) in %.1f s",
            "captured" if self.capture_enabled else "prepared (eager)",
            self.sizes[0],
            self.sizes[-1],
            len(self.sizes),
            time.perf_counter() - start,
        )

    def padded_size(self, num_rows: int) -> int | None:
        """The captured size a batch of num_rows runs as; None if larger than every size."""
        at = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[at] if at < len(self.sizes) else None

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: np.ndarray,
        block_table: np.ndarray,
    ) -> torch.Tensor:
        """Final hidden states [n, hidden_size] of a decode step with n = len(seq_lens) rows."""
        n = len(seq_lens)
        size = self.padded_size(n)
        if size is None or size not in self._captured:
            raise ValueError(f"no captured decode graph holds {n} rows (largest {self.sizes[-1]})")
        static = self.static
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        static.slot_mapping[:n].copy_(slot_mapping)
        static.slot_mapping[n:size].fill_(-1)
        lens = np.ones(size, dtype=np.int32)
        lens[:n] = seq_lens
        static.seq_lens[:size].copy_(to_device(lens, static.seq_lens.device))
        width = block_table.shape[1]
        table = np.asarray(block_table, dtype=np.int32)
        static.block_table[:n, :width].copy_(to_device(table, static.block_table.device))
        captured = self._captured[size]
        if captured.graph is None:
            return self._forward(size)[:n]
        captured.graph.replay()
        assert captured.hidden is not None
        return captured.hidden[:n]

    def _forward(self, size: int) -> torch.Tensor:
        metadata = self.backend.graph_decode_metadata(self.static, size)
        with set_forward_context(metadata):
            return self.model(self.input_ids[:size], self.positions[:size])
