"""Beam search, as HF transformers' `generate(num_beams=k)` runs it (vLLM's `use_beam_search`
and `LLM.beam_search`).

Each step asks the engine for one token of every running beam, with the top 2k logprobs of
each: a beam is a request whose prompt is the prompt plus the beam's tokens, so its blocks come
from the prefix cache and only the newest token (and the last partial block) is computed. The
choice among the candidates is HF's: the 2k best continuations by summed logprob; those ending
in EOS (or at max_tokens) among the best k become finished hypotheses, scored by the sum over
generated_length ** length_penalty; the best k others run on; the search ends when no running
beam can beat the worst of k finished ones (HF's early_stopping=False heuristic).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from lmserve.engine.protocol import EngineClient
from lmserve.lora.request import LoRARequest
from lmserve.outputs import CompletionOutput, Logprob, RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams

_OUT = -1.0e9  # HF's score for a continuation that may not run on


@dataclass
class BeamSearchSequence:
    """One returned beam. `tokens` holds the prompt's too, as vLLM's; `score` is HF's
    sequences_scores entry (cum_logprob / generated_length ** length_penalty)."""

    tokens: list[int]
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (it ended in EOS) or "length"
    text: str | None = None


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    cum_logprob: float
    score: float = 0.0  # once finished: normalized by its length


@dataclass
class BeamSearch:
    """One prompt's search, advanced a step at a time by whoever runs the engine."""

    prompt_token_ids: list[int]
    params: BeamSearchParams
    eos_token_id: int | None
    running: list[_Beam] = field(default_factory=lambda: [_Beam([], 0.0)])
    finished: list[_Beam] = field(default_factory=list)  # the best `beam_width`, best first
    done: bool = False

    def pending(self) -> list[list[int]]:
        """The token ids each running beam's next step runs on."""
        return [self.prompt_token_ids + beam.tokens for beam in self.running]

    def step(self, candidates: Sequence[Sequence[tuple[int, float]]]) -> None:
        """Advance by one token, given each running beam's best next tokens and logprobs."""
        width, lp = self.params.beam_width, self.params.length_penalty
        scored = [
            (beam.cum_logprob + logprob, i, token)
            for i, beam in enumerate(self.running)
            for token, logprob in candidates[i]
        ]
        scored.sort(key=lambda c: -c[0])
        scored = scored[: self.params.num_candidates]
        length = len(self.running[0].tokens) + 1  # every running beam has the same length
        hits = [self._ends(token, length) for _, _, token in scored]
        for position, (cum, i, token) in enumerate(scored[:width]):
            if hits[position]:
                tokens = [*self.running[i].tokens, token]
                self.finished.append(_Beam(tokens, cum, cum / length**lp))
        self.finished.sort(key=lambda beam: -beam.score)
        del self.finished[width:]
        ranked = sorted(range(len(scored)), key=lambda p: -(scored[p][0] + _OUT * hits[p]))
        self.running = [
            _Beam([*self.running[scored[p][1]].tokens, scored[p][2]], scored[p][0] + _OUT * hits[p])
            for p in ranked[:width]
        ]
        improvable = len(self.finished) < width or (
            self.running[0].cum_logprob / length**lp > self.finished[-1].score
        )
        self.done = not improvable or all(hits)

    def _ends(self, token: int, length: int) -> bool:
        eos = token == self.eos_token_id and not self.params.ignore_eos
        return eos or length >= self.params.max_tokens

    def output(self, tokenizer: object | None) -> BeamSearchOutput:
        sequences = []
        for beam in self.finished:
            ended = bool(beam.tokens) and beam.tokens[-1] == self.eos_token_id
            ended = ended and not self.params.ignore_eos
            shown = beam.tokens
            if ended and not self.params.include_stop_str_in_output:
                shown = beam.tokens[:-1]
            text = None
            if tokenizer is not None:
                text = tokenizer.decode(shown, skip_special_tokens=True)  # type: ignore[attr-defined]
            sequences.append(
                BeamSearchSequence(
                    tokens=self.prompt_token_ids + beam.tokens,
                    cum_logprob=beam.cum_logprob,
                    score=beam.score,
                    finish_reason="stop" if ended else "length",
                    text=text,
                )
            )
        return BeamSearchOutput(sequences)


def step_params(params: BeamSearchParams) -> SamplingParams:
    """One beam's step: one token, with the logprobs of its best candidates."""
    return SamplingParams(
        max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=params.num_candidates
    )


def check_logprob_limit(params: BeamSearchParams, max_logprobs: int) -> None:
    if max_logprobs != -1 and params.num_candidates > max_logprobs:
        raise ValueError(
            f"beam search with {params.beam_width} beams needs {params.num_candidates} "
            f"logprobs a step, more than --max-logprobs {max_logprobs}: use fewer beams or "
            f"start the server with --max-logprobs {params.num_candidates}"
        )


def top_candidates(entry: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
    """A step's k best next tokens, best first (the sampled token is among them or below)."""
    ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
    return [(token, lp.logprob) for token, lp in ranked[:k]]


def as_request_output(
    request_id: str, prompt: str | None, prompt_ids: list[int], result: BeamSearchOutput
) -> RequestOutput:
    """The beams as one finished request's n samples, so the server's shapes serve them."""
    n = len(prompt_ids)
    outputs = [
        CompletionOutput(
            index=i,
            text=seq.text or "",
            token_ids=seq.tokens[n:],
            cumulative_logprob=seq.cum_logprob,
            logprobs=None,
            finish_reason=seq.finish_reason,
        )
        for i, seq in enumerate(result.sequences)
    ]
    return RequestOutput(request_id, prompt, prompt_ids, None, outputs, finished=True)


def beam_search(
    engine: EngineClient,
    prompt: dict[str, object],
    params: BeamSearchParams,
    request_id: str,
    cache_salt: str | None = None,
    lora_request: LoRARequest | None = None,
) -> AsyncIterator[RequestOutput]:
    """The search's one (finished) output, as `engine.generate` streams; what cannot run is a
    ValueError here, before anything starts."""
    check_logprob_limit(params, engine.config.model.max_logprobs)
    return _search(engine, prompt, params, request_id, cache_salt, lora_request)


async def _search(
    engine: EngineClient,
    prompt: dict[str, object],
    params: BeamSearchParams,
    request_id: str,
    cache_salt: str | None,
    lora_request: LoRARequest | None,
) -> AsyncIterator[RequestOutput]:
    """Each step runs every beam at once, so the scheduler batches them."""
    prompt_ids = list(prompt["prompt_token_ids"])  # type: ignore[call-overload]
    search = BeamSearch(prompt_ids, params, engine.eos_token_id)
    sampling = step_params(params)
    step = 0
    while not search.done:
        tasks = [
            asyncio.ensure_future(
                _candidates(engine, ids, sampling, f"{request_id}-s{step}-b{i}", cache_salt,
                            lora_request)
            )
            for i, ids in enumerate(search.pending())
        ]  # fmt: skip
        try:
            search.step(await asyncio.gather(*tasks))
        finally:  # one beam failing (or the client leaving) aborts the others
            for task in tasks:
                task.cancel()
        step += 1
    prompt_text = prompt.get("prompt")
    result = search.output(engine.tokenizer)
    yield as_request_output(
        request_id, prompt_text if isinstance(prompt_text, str) else None, prompt_ids, result
    )


async def _candidates(
    engine: EngineClient,
    ids: list[int],
    sampling: SamplingParams,
    request_id: str,
    cache_salt: str | None,
    lora_request: LoRARequest | None,
) -> list[tuple[int, float]]:
    """One beam's step: its best next tokens and their logprobs."""
    last = None
    async for output in engine.generate(
        {"prompt_token_ids": ids}, sampling, request_id, cache_salt, lora_request
    ):
        last = output
    assert last is not None and last.outputs[0].logprobs
    return top_candidates(last.outputs[0].logprobs[0], sampling.logprobs or 0)
