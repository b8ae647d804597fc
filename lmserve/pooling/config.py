"""How a pooling model turns hidden states into its output: vLLM's --pooler-config, with its
defaults read from a sentence-transformers layout when the model directory has one."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

PoolingType = Literal["MEAN", "CLS", "LAST", "ALL"]
PoolingTask = Literal["embed", "classify"]
_ST_POOLING = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
               "pooling_mode_lasttoken": "LAST"}  # fmt: skip


@dataclass(frozen=True)
class PoolerConfig:
    pooling_type: PoolingType = "LAST"
    normalize: bool = True  # L2-normalize each embedding
    # embed: the pooled hidden state; classify: the model's classification head over it
    task: PoolingTask = "embed"
    activation: bool = True  # classify: probabilities (softmax; sigmoid for one label)
    dimensions: int | None = None  # embed: a Matryoshka model's default output size

    def __post_init__(self) -> None:
        if self.pooling_type not in ("MEAN", "CLS", "LAST", "ALL"):
            raise ValueError(
                f"pooling_type must be MEAN, CLS, LAST or ALL, got {self.pooling_type!r}"
            )
        if self.task == "classify" and self.pooling_type == "ALL":
            raise ValueError("a classifier pools one row per prompt: ALL pooling is for embed")
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")


@dataclass(frozen=True)
class SentenceTransformersLayout:
    """What a sentence-transformers directory says: its pooling, whether it normalizes, and
    the longest input it embeds (sentence_bert_config's max_seq_length)."""

    pooler: PoolerConfig
    max_seq_length: int | None


def read_sentence_transformers(path: Path) -> SentenceTransformersLayout | None:
    """The layout of `path` (modules.json with a Pooling module), or None when it has none.
    A pooling mode lmserve does not have is an error that names it."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {m.get("type", "").rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        return None
    pooling = json.loads((path / kinds["Pooling"]["path"] / "config.json").read_text())
    modes = [mode for key, mode in _ST_POOLING.items() if pooling.get(key)]
    unknown = [
        key for key, on in pooling.items() if key.startswith("pooling_mode") and on
        and key not in _ST_POOLING
    ]  # fmt: skip
    if unknown or len(modes) != 1:
        raise ValueError(
            f"{path}: sentence-transformers pooling {unknown or modes} is not supported; "
            "one of mean, cls or last-token pooling is"
        )
    bert_config = path / "sentence_bert_config.json"
    max_len = (
        json.loads(bert_config.read_text()).get("max_seq_length") if bert_config.exists() else None
    )
    return SentenceTransformersLayout(PoolerConfig(modes[0], "Normalize" in kinds), max_len)  # type: ignore[arg-type]


# vLLM's --task, as (runner, convert)
TASKS = {"generate": ("generate", None), "embed": ("pooling", "embed"),
         "classify": ("pooling", "classify"), "score": ("pooling", "classify"),
         "reward": ("pooling", "embed")}  # fmt: skip
RUNNERS = ("auto", "generate", "pooling")
CONVERTS = ("auto", "embed", "classify")
# encoder architectures: they only pool, so `auto` runs them with the pooling runner
ENCODER_ARCHITECTURES = frozenset(
    f"{family}{kind}"
    for family in ("Bert", "Roberta", "XLMRoberta")
    for kind in ("Model", "ForSequenceClassification")
)
# decoders the pooling runner takes: as embedders (--convert embed), or with their own
# classification head
DECODER_ARCHITECTURES = frozenset(
    f"{family}For{kind}"
    for family in ("Llama", "Mistral", "Qwen2", "Qwen3")
    for kind in ("CausalLM", "SequenceClassification")
)


@dataclass(frozen=True)
class Runner:
    runner: str  # generate or pooling
    convert: PoolingTask | None  # what the pooling runner makes of the model


def resolve_runner(runner: str, convert: str, task: str | None, architecture: str) -> Runner:
    """vLLM's --runner / --convert / --task to the runner this model runs with; what it cannot
    do is an error that says what would work."""
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        wanted, converted = TASKS[task]
        if runner not in ("auto", wanted):
            raise ValueError(f"--task {task} runs the {wanted} runner, not --runner {runner}")
        runner, convert = wanted, converted or convert
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if convert not in CONVERTS:
        raise ValueError(f"convert must be one of {', '.join(CONVERTS)}, got {convert!r}")
    classifier = architecture.endswith("ForSequenceClassification")
    pools_only = architecture in ENCODER_ARCHITECTURES or classifier
    if runner == "auto":
        runner = "pooling" if pools_only or convert != "auto" else "generate"
    if runner == "generate":
        if pools_only:
            raise ValueError(
                f"{architecture} is a pooling model: run it with --runner pooling "
                f"(or --task {'classify' if classifier else 'embed'})"
            )
        return Runner("generate", None)
    if architecture not in ENCODER_ARCHITECTURES | DECODER_ARCHITECTURES:
        raise ValueError(
            f"{architecture} cannot run with the pooling runner; it takes "
            f"{', '.join(sorted(ENCODER_ARCHITECTURES | DECODER_ARCHITECTURES))}"
        )
    if convert == "auto":
        convert = "classify" if classifier else "embed"
    if convert == "classify" and not classifier:
        raise ValueError(
            f"--convert classify needs a checkpoint with a classification head "
            f"(*ForSequenceClassification); {architecture} has none: use --convert embed"
        )
    if convert == "embed" and classifier:
        raise ValueError(
            f"{architecture} is a classifier: serve it with --convert classify (--task classify)"
        )
    return Runner("pooling", convert)  # type: ignore[arg-type]


_POOLER_KEYS = {"pooling_type", "normalize", "activation", "use_activation", "dimensions"}


def resolve_pooler(
    override: dict[str, Any] | str | None, path: Path, architecture: str, task: PoolingTask
) -> PoolerConfig:
    """--pooler-config over the model's defaults: its sentence-transformers layout if it has
    one, else vLLM's: CLS for an encoder, last token for a decoder; embeddings normalized."""
    layout = read_sentence_transformers(path) if task == "embed" else None
    encoder = architecture in ENCODER_ARCHITECTURES
    if layout is not None:
        base = layout.pooler
    else:
        base = PoolerConfig("CLS" if encoder else "LAST", normalize=task == "embed", task=task)
    if override is None:
        return base
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--pooler-config is not valid JSON: {exc}") from None
    if not isinstance(override, dict):
        raise ValueError("--pooler-config must be a JSON object")
    unknown = sorted(set(override) - _POOLER_KEYS)
    if unknown:
        raise ValueError(f"--pooler-config takes {', '.join(sorted(_POOLER_KEYS))}, not {unknown}")
    override = dict(override)
    if "use_activation" in override:  # vLLM's newer name
        override["activation"] = override.pop("use_activation")
    return replace(base, **override)
