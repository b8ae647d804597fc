"""Per-request sampling parameters, validated where they are made so bad values never reach the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM's bound on logprob_token_ids


@dataclass
class StructuredOutputsParams:
    """One output constraint (vLLM's `structured_outputs`): a JSON schema, any JSON object, a
    regex, a choice of strings, an EBNF grammar or a structural tag (tagged spans of the
    output held to their own schemas, as tool calls are).

    `whitespace_pattern` replaces the bounded default between JSON tokens. `backend` is filled in
    by the engine frontend once it has checked which backend can enforce the constraint.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None  # xgrammar's structural tag, as JSON text
    whitespace_pattern: str | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                f"json_object or structural_tag, got {', '.join(given) or 'none'}"
            )
        if self.choice is not None and (
            not self.choice or not all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("choice must be a non-empty list of strings")

    @property
    def kind(self) -> str:
        return next(name for name in _CONSTRAINTS if getattr(self, name) not in (None, False))


_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class SamplingParams:
    """vLLM's sampling parameters with vLLM's defaults and meanings.

    `temperature=0` is greedy; `seed` makes a request's samples independent of what else is batched.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # -1: the whole vocabulary
    prompt_logprobs: int | None = None  # -1: the whole vocabulary
    logprob_token_ids: list[int] | None = None  # these tokens' logprobs, beside the sampled one
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1 (disable), or at least 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.repetition_penalty > 0.0,
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                f"got {self.min_tokens}",
            ),
            (
                self.logprobs is None or self.logprobs >= -1,
                f"logprobs must be non-negative or -1 (the vocabulary), got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= -1,
                "prompt_logprobs must be non-negative or -1 (the vocabulary), got "
                f"{self.prompt_logprobs}",
            ),
            (
                not self.logprob_token_ids or self.logprobs is not None,
                "logprob_token_ids needs logprobs to be asked for",
            ),
            (
                len(self.logprob_token_ids or ()) <= MAX_LOGPROB_TOKEN_IDS,
                f"logprob_token_ids takes at most {MAX_LOGPROB_TOKEN_IDS} ids, got "
                f"{len(self.logprob_token_ids or ())}",
            ),
            (all(s for s in self.stop_strings), "stop must not contain empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        """Whether presence, frequency or repetition penalties change its logits."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of `n` samples: n=1, and a distinct seed derived from ours."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's BeamSearchParams. `temperature` is accepted for its API and has no effect: the
    beams are ranked by the model's raw logprobs, as vLLM's V1 engine ranks them."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise ValueError(f"beam_width must be at least 1, got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def num_candidates(self) -> int:
        """Continuations kept each step (HF's beams_to_keep with one EOS id): the logprobs a
        step asks of each beam."""
        return 2 * self.beam_width
