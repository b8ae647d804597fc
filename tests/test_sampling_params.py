"""SamplingParams validation: each bad value is a ValueError naming the field."""

from __future__ import annotations

import pytest

from lmserve import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(n=0), "n"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=-2), "logprobs"),  # -1 is the whole vocabulary
        (dict(prompt_logprobs=-2), "prompt_logprobs"),
        (dict(stop=["ok", ""]), "stop"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} "):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation() -> None:
    params = SamplingParams(stop="END", top_k=-1, logit_bias={"5": 1})
    assert params.stop_strings == ["END"]
    assert params.top_k == 0
    assert params.logit_bias == {5: 1.0}
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy
    assert SamplingParams(n=3, seed=7).for_child(2).seed == 9
