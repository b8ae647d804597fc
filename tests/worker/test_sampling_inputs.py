"""Sampling inputs for the rows of a speculative step: each later position counts its own
output tokens (min_tokens bans, seeded noise)."""

from __future__ import annotations

import numpy as np
import torch

from lmserve.core.scheduler_output import NewRequestData
from lmserve.sampling_params import SamplingParams
from lmserve.worker.input_batch import InputBatch
from lmserve.worker.sampling_inputs import build_sampling_metadata, step_generator


def test_each_checked_position_counts_its_own_outputs() -> None:
    batch = InputBatch(max_num_reqs=2, max_model_len=64, max_blocks_per_req=8)
    params = SamplingParams(temperature=0.8, seed=5, min_tokens=6, stop_token_ids=[9])
    prompt, outputs = [3, 4, 5], [7, 7, 7, 7]  # 4 outputs so far
    batch.add(NewRequestData("r", prompt + outputs, len(prompt), params, [1], 0, eos_token_id=2))
    rows = np.zeros(5, dtype=np.int64)  # one request: 4 guesses + the position past them
    md = build_sampling_metadata(batch, rows, 16, torch.device("cpu"), np.arange(5))
    # positions 4 and 5 still ban the stop ids and EOS; from the 6th output on they may end
    assert [row for row, _ in md.banned_tokens] == [0, 1]
    assert all(sorted(ids) == [2, 9] for _, ids in md.banned_tokens)
    for i in range(5):
        expected = torch.rand(1, generator=step_generator(5, 4 + i))
        assert torch.equal(torch.rand(1, generator=md.generators[i]), expected)
