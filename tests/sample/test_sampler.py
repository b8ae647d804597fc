"""The sampler on hand-made logits: distributions, filters, penalties, bias and logprobs."""

from __future__ import annotations

import pytest
import torch

from lmserve.sample.metadata import PenaltyInputs, SamplingMetadata
from lmserve.sample.sampler import Sampler, _apply_penalties

PROBS = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])


def metadata(rows: int, **overrides) -> SamplingMetadata:
    fields = dict(
        temperature=torch.ones(rows),
        all_greedy=False,
        top_k=None,
        top_p=None,
        min_p=None,
        generators={},
        penalties=None,
        logit_bias=[],
        banned_tokens=[],
        max_num_logprobs=None,
    )
    fields.update(overrides)
    return SamplingMetadata(**fields)


def sample_counts(rows: int = 20000, **overrides) -> torch.Tensor:
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = PROBS.log().expand(rows, -1).clone()
    tokens = sampler(logits, metadata(rows, **overrides)).sampled_token_ids
    return torch.bincount(tokens, minlength=len(PROBS)).float() / rows


def test_samples_follow_the_distribution() -> None:
    assert torch.allclose(sample_counts(), PROBS, atol=0.015)


def test_temperature_sharpens() -> None:
    freq = sample_counts(temperature=torch.full((20000,), 0.25))
    sharpened = torch.softmax(PROBS.log() / 0.25, -1)
    assert torch.allclose(freq, sharpened, atol=0.015)


def test_top_k_top_p_min_p_filter() -> None:
    rows = 5000
    top_k = sample_counts(rows, top_k=torch.full((rows,), 2))
    assert top_k[:3].sum() == 0 and torch.allclose(
        top_k[3:], torch.tensor([3 / 7, 4 / 7]), atol=0.03
    )
    top_p = sample_counts(rows, top_p=torch.full((rows,), 0.5))  # 0.4 + 0.3 covers it
    assert top_p[:3].sum() == 0
    min_p = sample_counts(rows, min_p=torch.full((rows,), 0.5))  # keeps p >= 0.2
    assert min_p[:3].sum() == 0 and min_p[3:].sum() == 1


def test_greedy_rows_take_the_argmax_beside_sampled_rows() -> None:
    temperature = torch.tensor([0.0, 1.0] * 500)
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = PROBS.log().expand(1000, -1).clone()
    tokens = sampler(logits, metadata(1000, temperature=temperature)).sampled_token_ids
    assert (tokens[::2] == 4).all()
    assert (tokens[1::2] != 4).any()


def test_seeded_rows_repeat() -> None:
    logits = torch.randn(3, 1000)

    def draw() -> list[int]:
        gens = {0: torch.Generator().manual_seed(7), 2: torch.Generator().manual_seed(8)}
        sampler = Sampler(torch.Generator().manual_seed(torch.seed() % 2**32))
        return sampler(logits.clone(), metadata(3, generators=gens)).sampled_token_ids.tolist()

    first, second = draw(), draw()
    assert first[0] == second[0] and first[2] == second[2]


def test_bias_bans_and_penalties() -> None:
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5]])
    greedy = metadata(1, temperature=torch.zeros(1), all_greedy=True)
    biased = metadata(1, temperature=torch.zeros(1), all_greedy=True, logit_bias=[(0, [2], [10.0])])
    assert sampler(logits.clone(), biased).sampled_token_ids.item() == 2
    banned = metadata(1, temperature=torch.zeros(1), all_greedy=True, banned_tokens=[(0, [0])])
    assert sampler(logits.clone(), banned).sampled_token_ids.item() == 1
    penalties = PenaltyInputs(
        rows=torch.tensor([0]),
        presence=torch.tensor([0.5]),
        frequency=torch.tensor([0.25]),
        repetition=torch.tensor([2.0]),
        output_token_ids=torch.tensor([[0, 0, 4]]),  # 4 = padding (vocab size)
        prompt_token_ids=torch.tensor([[2, 4]]),
    )
    out = logits.clone()
    _apply_penalties(out, penalties)
    # token 0: seen twice in output: 2.0 / 2 - 0.25 * 2 - 0.5; token 2: prompt only: -1.0 * 2
    assert out[0].tolist() == pytest.approx([1.0 - 0.5 - 0.5, 1.0, -2.0, 0.5])
    assert sampler(logits.clone(), greedy).sampled_token_ids.item() == 0


def test_logprobs_are_raw_with_rank() -> None:
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    md = metadata(
        1, temperature=torch.zeros(1), all_greedy=True, max_num_logprobs=2, banned_tokens=[(0, [1])]
    )
    out = sampler(logits.clone(), md)
    raw = torch.log_softmax(logits, -1)
    assert out.sampled_token_ids.item() == 2  # token 1 banned
    assert out.logprob_token_ids.tolist() == [[2, 1, 2]]
    assert torch.allclose(out.logprobs, raw[0, [2, 1, 2]].unsqueeze(0))
    assert out.sampled_ranks.item() == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_seeded_rows_draw_from_host_generators() -> None:
    """Seeded rows keep host generators (their draws must not depend on the device), so on CUDA
    the same seeds give the CPU's tokens for the same logits."""
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))

    def sample(device: str) -> list[int]:
        generators = {i: torch.Generator().manual_seed(10 + i) for i in (0, 2)}
        md = metadata(4, generators=generators, temperature=torch.ones(4, device=device))
        sampler = Sampler(torch.Generator(device=device).manual_seed(0))
        return sampler(logits.to(device), md).sampled_token_ids.tolist()

    cpu, gpu = sample("cpu"), sample("cuda")
    assert [cpu[0], cpu[2]] == [gpu[0], gpu[2]]


def test_skipping_argmax_and_unit_temperature_changes_no_sample() -> None:
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(1)) * 3
    fast = metadata(64, any_greedy=False, unit_temperature=True)
    full = Sampler(torch.Generator().manual_seed(7))(logits, metadata(64)).sampled_token_ids
    quick = Sampler(torch.Generator().manual_seed(7))(logits, fast).sampled_token_ids
    assert torch.equal(full, quick)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of observed `counts` under `probs` (categories with p > 0)."""
    from scipy.stats import chisquare

    keep = probs > 0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return float(chisquare(counts[keep].numpy(), expected.numpy()).pvalue)


@pytest.mark.parametrize("draft", [0, 2, 4])
def test_checking_a_guess_keeps_the_distribution(draft: int) -> None:
    """Rejection sampling against a one-hot guess: the token a row ends with (the guess when
    accepted, else the replacement) is distributed as the model's own sample, and the guess is
    accepted with its probability."""
    rows = 40000
    sampler = Sampler(torch.Generator().manual_seed(1))
    logits = PROBS.log().expand(rows, -1).clone()
    out = sampler(logits, metadata(rows), torch.full((rows,), draft))
    counts = torch.bincount(out.sampled_token_ids, minlength=len(PROBS)).float()
    assert chi_square_p(counts, PROBS) > 1e-3
    assert out.accepted is not None
    assert abs(out.accepted.float().mean().item() - PROBS[draft].item()) < 0.01
    assert (out.sampled_token_ids[out.accepted] == draft).all()
    assert (out.sampled_token_ids[~out.accepted] != draft).all()


def test_checking_guesses_under_filters_and_temperature() -> None:
    """The check applies after temperature and top-k: a guess the filter removed is never
    accepted; greedy rows keep a guess only where it is the argmax; rows without a guess
    (-1) sample as usual."""
    rows = 30000
    temperature = torch.full((rows,), 0.5)
    sampler = Sampler(torch.Generator().manual_seed(2))
    logits = PROBS.log().expand(rows, -1).clone()
    drafts = torch.tensor([1, 3, -1]).repeat(rows // 3)
    out = sampler(
        logits, metadata(rows, temperature=temperature, top_k=torch.full((rows,), 3)), drafts
    )
    target = torch.softmax(PROBS.log() / 0.5, -1)
    target[:2] = 0
    target /= target.sum()
    for i in range(3):
        counts = torch.bincount(out.sampled_token_ids[i::3], minlength=len(PROBS)).float()
        assert counts[:2].sum() == 0
        assert chi_square_p(counts, target) > 1e-3
    assert not out.accepted[0::3].any()  # token 1 is outside the top 3
    assert not out.accepted[2::3].any()  # no guess
    greedy = torch.tensor([0.0, 0.0])
    out = Sampler(torch.Generator().manual_seed(0))(
        PROBS.log().expand(2, -1).clone(),
        metadata(2, temperature=greedy, all_greedy=True),
        torch.tensor([4, 3]),
    )
    assert out.accepted.tolist() == [True, False]
    assert out.sampled_token_ids.tolist() == [4, 4]


def test_seeded_rows_draw_their_usual_first_number_when_checking() -> None:
    """A seeded row with no guess samples what it samples without speculation."""
    logits = torch.randn(2, 1000)

    def draw(drafts: torch.Tensor | None) -> list[int]:
        gens = {0: torch.Generator().manual_seed(7), 1: torch.Generator().manual_seed(8)}
        sampler = Sampler(torch.Generator().manual_seed(torch.seed() % 2**32))
        return sampler(
            logits.clone(), metadata(2, generators=gens), drafts
        ).sampled_token_ids.tolist()

    assert draw(torch.tensor([-1, -1])) == draw(None)
