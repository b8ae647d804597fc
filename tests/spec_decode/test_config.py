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
        ({"method": "eagle", "num_speculative_tokens": 2}, "'ngram', 'draft_model'"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "named by speculative_config"),
        ({"model": "/no/such/draft", "num_speculative_tokens": 2}, "/no/such/draft"),
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


def test_a_draft_model_is_read_as_the_target_is(tiny_model_dirs) -> None:
    """vLLM's form: a model that is not "[ngram]" is a draft model, loaded beside the target
    at its max_model_len and seed, on an attention backend of its own."""
    draft = tiny_model_dirs["mistral"]
    config = create_engine_config(
        str(tiny_model_dirs["llama"]),
        max_model_len=256,
        seed=7,
        speculative_config={"model": str(draft), "num_speculative_tokens": 3},
    )
    assert config.speculative.method == "draft_model"
    assert config.draft is not None
    assert config.draft.model.path == draft
    assert (config.draft.model.max_model_len, config.draft.model.seed) == (256, 7)
    assert config.draft.model.quantization is None
    assert config.draft.attention_backend == config.attention_backend


def test_a_draft_must_share_the_vocabulary_and_reach_max_model_len(
    tiny_model_dirs, tmp_path
) -> None:
    import json
    import shutil

    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_model_dirs["mistral"], other)
    hf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hf, "vocab_size": hf["vocab_size"] + 1}))
    spec = {"model": str(other), "num_speculative_tokens": 2}
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        create_engine_config(str(tiny_model_dirs["llama"]), speculative_config=spec)
    (other / "config.json").write_text(json.dumps({**hf, "max_position_embeddings": 64}))
    with pytest.raises(ValueError, match="lower --max-model-len"):
        create_engine_config(str(tiny_model_dirs["llama"]), speculative_config=spec)
    with pytest.raises(ValueError, match="draft's quantization"):
        create_engine_config(
            str(tiny_model_dirs["llama"]),
            speculative_config={**spec, "model": str(tiny_model_dirs["mistral"]),
                                "quantization": "fp8"},
        )  # fmt: skip
