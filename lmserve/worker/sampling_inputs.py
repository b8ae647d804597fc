"""Build the sampler's per-step inputs from the input batch's rows (vectorized where common)."""

from __future__ import annotations

import numpy as np
import torch

from lmserve.sample.metadata import PenaltyInputs, SamplingMetadata
from lmserve.transfer import to_device
from lmserve.worker.input_batch import InputBatch

_SEED_MIX = 0x9E3779B97F4A7C15


def step_generator(seed: int, num_output_tokens: int) -> torch.Generator:
    """A seeded request's noise for its n-th token depends on (seed, n) only: batch mates and
    preemption cannot change it."""
    mixed = (seed * _SEED_MIX + num_output_tokens) % (1 << 63)
    return torch.Generator().manual_seed(mixed)


def build_sampling_metadata(
    batch: InputBatch,
    rows: np.ndarray,
    vocab_size: int,
    device: torch.device,
    offsets: np.ndarray | None = None,
) -> SamplingMetadata:
    """`offsets[i]`: how many tokens past its request's last one row i samples (a speculative
    step's later positions), for the rules that count output tokens: seeds and min_tokens."""
    temperature = batch.temperature[rows]
    top_k = batch.top_k[rows]
    top_p = batch.top_p[rows]
    min_p = batch.min_p[rows]
    generators: dict[int, torch.Generator] = {}
    logit_bias = []
    banned = []
    penalty_rows = []
    max_logprobs: int | None = None
    by_id: list[tuple[int, list[int]]] = []
    for i, row in enumerate(rows.tolist()):
        state = batch.state(row)
        params = state.params
        num_out = int(batch.num_tokens[row]) - state.num_prompt_tokens
        if offsets is not None:
            num_out += int(offsets[i])
        if params.seed is not None and not params.greedy:
            generators[i] = step_generator(params.seed, num_out)
        if params.logit_bias:
            logit_bias.append((i, list(params.logit_bias), list(params.logit_bias.values())))
        if num_out < params.min_tokens:
            stop_ids = list(params.stop_token_ids or [])
            if state.eos_token_id is not None and not params.ignore_eos:
                stop_ids.append(state.eos_token_id)
            if stop_ids:
                banned.append((i, stop_ids))
        if params.has_penalties:
            penalty_rows.append(i)
        if params.logprobs is not None:
            max_logprobs = max(max_logprobs or 0, params.logprobs)
        if params.logprob_token_ids:
            by_id.append((i, params.logprob_token_ids))
            max_logprobs = max(max_logprobs or 0, len(params.logprob_token_ids))
    greedy = temperature == 0
    return SamplingMetadata(
        temperature=to_device(temperature, device),
        all_greedy=bool(greedy.all()),
        top_k=to_device(top_k, device) if top_k.any() else None,
        top_p=to_device(top_p, device) if (top_p < 1).any() else None,
        min_p=to_device(min_p, device) if min_p.any() else None,
        generators=generators,
        penalties=_penalty_inputs(batch, rows, penalty_rows, vocab_size, device),
        logit_bias=logit_bias,
        banned_tokens=banned,
        max_num_logprobs=max_logprobs,
        any_greedy=bool(greedy.any()),
        unit_temperature=bool((greedy | (temperature == 1)).all()),
        logprob_token_ids=by_id,
    )


def _penalty_inputs(
    batch: InputBatch, rows: np.ndarray, penalty_rows: list[int], vocab: int, device: torch.device
) -> PenaltyInputs | None:
    if not penalty_rows:
        return None
    params = [batch.state(int(rows[i])).params for i in penalty_rows]
    outputs = [batch.output_token_ids(int(rows[i])) for i in penalty_rows]
    prompts = [batch.prompt_token_ids(int(rows[i])) for i in penalty_rows]
    return PenaltyInputs(
        rows=to_device(np.array(penalty_rows, dtype=np.int64), device),
        presence=_floats([p.presence_penalty for p in params], device),
        frequency=_floats([p.frequency_penalty for p in params], device),
        repetition=_floats([p.repetition_penalty for p in params], device),
        output_token_ids=_pad(outputs, vocab, device),
        prompt_token_ids=_pad(prompts, vocab, device),
    )


def _pad(seqs: list[np.ndarray], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return to_device(out, device)


def _floats(values: list[float], device: torch.device) -> torch.Tensor:
    return to_device(np.array(values, dtype=np.float32), device)
