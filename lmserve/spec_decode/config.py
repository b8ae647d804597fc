"""vLLM's --speculative-config: which proposer guesses the next tokens, and how many."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KEYS = {
    "method",
    "model",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "quantization",
}
METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """N-gram (prompt lookup) speculation: the tokens that followed the latest earlier match of
    the sequence's last `prompt_lookup_min`..`prompt_lookup_max` tokens are the guess. A draft
    model (`model`, a smaller one of the same vocabulary) guesses greedily instead."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    method: str = "ngram"
    model: str | None = None  # the draft model (method "draft_model")
    quantization: str | None = None  # the draft's (None: its default, as the target's)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError(
                "a draft model is named by speculative_config's model, with method draft_model "
                "(or no method); ngram takes no model"
            )
        if self.num_speculative_tokens < 1:
            raise ValueError(
                f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}"
            )
        if self.prompt_lookup_min < 1:
            raise ValueError(f"prompt_lookup_min must be at least 1, got {self.prompt_lookup_min}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) must not exceed "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"


def parse_speculative_config(value: dict[str, Any] | None) -> SpeculativeConfig | None:
    """From vLLM's JSON object (the engine arguments parse the text). As vLLM: `"model":
    "[ngram]"` names the method too, any other model is a draft model, and a missing lookup
    bound takes the other's value (both missing: 5)."""
    if value is None:
        return None
    unknown = sorted(set(value) - _KEYS)
    if unknown:
        raise ValueError(f"speculative_config has unknown keys {unknown}; known: {sorted(_KEYS)}")
    model = value.get("model")
    if model in ("ngram", "[ngram]"):
        method, model = value.get("method") or "ngram", None
    else:
        method = value.get("method") or ("draft_model" if model is not None else "ngram")
    if method == "[ngram]":
        method = "ngram"
    if "num_speculative_tokens" not in value:
        raise ValueError("speculative_config needs num_speculative_tokens")
    low, high = value.get("prompt_lookup_min"), value.get("prompt_lookup_max")
    low, high = low if low is not None else high, high if high is not None else low
    return SpeculativeConfig(
        num_speculative_tokens=int(value["num_speculative_tokens"]),
        prompt_lookup_max=int(high if high is not None else 5),
        prompt_lookup_min=int(low if low is not None else 5),
        method=method,
        model=None if model is None else str(model),
        quantization=value.get("quantization"),
    )
