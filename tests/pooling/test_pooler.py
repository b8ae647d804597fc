"""The poolers on packed hidden states, and the sentence-transformers layout they default to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lmserve.pooling.config import (
    PoolerConfig,
    read_sentence_transformers,
    resolve_pooler,
    resolve_runner,
)
from lmserve.pooling.pooler import pool

HIDDEN = torch.arange(12, dtype=torch.float32).view(6, 2) + 1  # prompts of 2, 3 and 1 tokens
LENS = [2, 3, 1]


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("MEAN", [[2.0, 3.0], [7.0, 8.0], [11.0, 12.0]]),
     ("CLS", [[1.0, 2.0], [5.0, 6.0], [11.0, 12.0]]),
     ("LAST", [[3.0, 4.0], [9.0, 10.0], [11.0, 12.0]])],
)  # fmt: skip
def test_each_pooling_reduces_its_own_prompt(kind: str, expected) -> None:
    raw = pool(HIDDEN, LENS, PoolerConfig(kind, normalize=False))
    assert torch.stack(raw).tolist() == expected
    normalized = torch.stack(pool(HIDDEN, LENS, PoolerConfig(kind, normalize=True)))
    assert torch.allclose(normalized.norm(dim=-1), torch.ones(3))
    assert torch.allclose(normalized, torch.nn.functional.normalize(torch.tensor(expected), dim=-1))


def test_all_keeps_every_token() -> None:
    rows = pool(HIDDEN, LENS, PoolerConfig("ALL", normalize=False))
    assert [r.shape[0] for r in rows] == LENS and torch.equal(torch.cat(rows), HIDDEN)


def test_an_unknown_pooling_type_is_refused() -> None:
    with pytest.raises(ValueError, match="MEAN, CLS, LAST or ALL"):
        PoolerConfig("MAX")  # type: ignore[arg-type]


def test_the_sentence_transformers_layout_gives_the_defaults(minilm_dir: Path, tmp_path) -> None:
    layout = read_sentence_transformers(minilm_dir)
    assert layout is not None
    assert layout.pooler == PoolerConfig("MEAN", normalize=True) and layout.max_seq_length == 256
    assert read_sentence_transformers(tmp_path) is None  # no modules.json: no layout
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))  # fmt: skip
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_max_tokens": True})
    )
    with pytest.raises(ValueError, match="pooling_mode_max_tokens"):
        read_sentence_transformers(tmp_path)
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": True})
    )
    plain = read_sentence_transformers(tmp_path)
    assert plain == plain.__class__(PoolerConfig("CLS", normalize=False), None)


@pytest.mark.parametrize(
    ("runner", "convert", "task", "architecture", "expected"),
    [("auto", "auto", None, "BertModel", ("pooling", "embed")),
     ("auto", "auto", None, "XLMRobertaForSequenceClassification", ("pooling", "classify")),
     ("auto", "auto", None, "Qwen2ForSequenceClassification", ("pooling", "classify")),
     ("auto", "auto", None, "Qwen2ForCausalLM", ("generate", None)),
     ("auto", "embed", None, "Qwen2ForCausalLM", ("pooling", "embed")),
     ("auto", "auto", "embed", "LlamaForCausalLM", ("pooling", "embed")),
     ("auto", "auto", "score", "BertForSequenceClassification", ("pooling", "classify")),
     ("pooling", "auto", None, "Qwen3ForCausalLM", ("pooling", "embed"))],
)  # fmt: skip
def test_runner_resolution(runner, convert, task, architecture, expected) -> None:
    resolved = resolve_runner(runner, convert, task, architecture)
    assert (resolved.runner, resolved.convert) == expected


@pytest.mark.parametrize(
    ("args", "says"),
    [(("generate", "auto", None, "BertModel"), "--runner pooling"),
     (("auto", "classify", None, "LlamaForCausalLM"), "has none: use --convert embed"),
     (("auto", "embed", None, "BertForSequenceClassification"), "--convert classify"),
     (("pooling", "auto", None, "GPT2LMHeadModel"), "cannot run with the pooling runner"),
     (("generate", "auto", "embed", "BertModel"), "runs the pooling runner")],
)  # fmt: skip
def test_runner_resolution_errors(args, says) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        resolve_runner(*args)


def test_pooler_config_overrides_the_model_defaults(minilm_dir: Path, tmp_path: Path) -> None:
    base = resolve_pooler(None, minilm_dir, "BertModel", "embed")
    assert base == PoolerConfig("MEAN", normalize=True)  # the sentence-transformers layout
    override = '{"pooling_type": "CLS", "normalize": false, "dimensions": 128}'
    assert resolve_pooler(override, minilm_dir, "BertModel", "embed") == PoolerConfig(
        "CLS", normalize=False, dimensions=128
    )
    decoder = resolve_pooler({"use_activation": False}, tmp_path, "Qwen2ForCausalLM", "classify")
    assert decoder == PoolerConfig("LAST", normalize=False, task="classify", activation=False)
    with pytest.raises(ValueError, match="not \\['softmax'\\]"):
        resolve_pooler({"softmax": True}, tmp_path, "BertModel", "embed")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_pooler("{oops", tmp_path, "BertModel", "embed")
    with pytest.raises(ValueError, match="ALL pooling is for embed"):
        PoolerConfig("ALL", task="classify")
