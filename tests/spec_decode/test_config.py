"""--speculative-config as vLLM reads it, and the clear refusals."""

from __future__ import annotations

import pytest

from lmserve.engine.args import create_engine_config
from lmserve.spec_decode.config import SpeculativeConfig, parse_speculative_config


def test_json_and_dict_forms(tiny_model_dirs) -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 2}'
    expected = SpeculativeConfig(num_speculative_tokens=4, prompt_lookup_max=3, prompt_lookup_min=2)
    config = create_engine_config(str(tiny_model_dirs["llama"]), speculative_config=text)
    assert config.speculative == expected
    assert (
        parse_speculative_config(
            {
                "model": "[ngram]",
                "num_speculative_tokens": 4,
                "prompt_lookup_max": 3,
                "prompt_lookup_min": 2,
            }
        )
        == expected
    )
    assert parse_speculative_config(None) is None


def test_lookup_bounds_default_as_vllms() -> None:
    both = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (5, 5)
    only_max = parse_speculative_config(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = parse_speculative_config(
        {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2}
    )
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "at least 1"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "'ngram'"),
        ({"model": "Qwen/Qwen3-0.6B", "num_speculative_tokens": 2}, "draft model"),
        ({"method": "ngram", "num_speculative_tokens": 2, "temperature": 1}, "unknown keys"),
        (
            {
                "method": "ngram",
                "num_speculative_tokens": 2,
                "prompt_lookup_min": 4,
                "prompt_lookup_max": 2,
            },
            "must not exceed",
        ),  # fmt: skip
    ],
)
def test_refusals_say_why(tiny_model_dirs, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        create_engine_config(str(tiny_model_dirs["llama"]), speculative_config=value)


def test_engine_config_carries_it(tiny_model_dirs) -> None:
    config = create_engine_config(
        str(tiny_model_dirs["llama"]),
        speculative_config='{"method": "ngram", "num_speculative_tokens": 3}',
    )
    assert config.speculative == SpeculativeConfig(num_speculative_tokens=3)


def test_pooling_and_encoder_decoder_models_refuse_it(tiny_pooling_dirs, whisper_dir) -> None:
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    with pytest.raises(ValueError, match="not a pooling model"):
        create_engine_config(
            str(next(iter(tiny_pooling_dirs.values()))), runner="pooling", speculative_config=spec
        )
    with pytest.raises(ValueError, match="not an encoder-decoder model"):
        create_engine_config(str(whisper_dir), speculative_config=spec)
