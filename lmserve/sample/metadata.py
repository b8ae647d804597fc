"""Per-step sampling inputs for the rows being sampled, built by the worker's input batch."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PenaltyInputs:
    """Rows using presence/frequency/repetition penalties, with their token histories."""

    rows: torch.Tensor  # [P] row index into the logits
    presence: torch.Tensor  # [P]
    frequency: torch.Tensor  # [P]
    repetition: torch.Tensor  # [P]
    output_token_ids: torch.Tensor  # [P, max_out] padded with vocab_size
    prompt_token_ids: torch.Tensor  # [P, max_prompt] padded with vocab_size


@dataclass(frozen=True)
class SamplingMetadata:
    temperature: torch.Tensor  # [R] (greedy rows hold 0)
    all_greedy: bool
    top_k: torch.Tensor | None  # [R] 0 = off; None when no row uses it
    top_p: torch.Tensor | None  # [R] 1 = off
    min_p: torch.Tensor | None  # [R] 0 = off
    generators: dict[int, torch.Generator]  # row -> per-request seeded generator
    penalties: PenaltyInputs | None
    logit_bias: list[tuple[int, list[int], list[float]]]  # (row, token ids, biases)
    banned_tokens: list[tuple[int, list[int]]]  # (row, stop ids masked until min_tokens)
    max_num_logprobs: int | None  # largest `logprobs` asked for in the batch
    # Host-side facts that let the sampler skip whole-vocabulary passes (argmax, division);
    # the defaults skip nothing.
    any_greedy: bool = True
    unit_temperature: bool = False  # every sampled (non-greedy) row has temperature 1
    # (row, token ids) whose logprobs a row asked for by id, in place of its top-k
    logprob_token_ids: list[tuple[int, list[int]]] = field(default_factory=list)
