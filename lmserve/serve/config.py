"""Ray Serve LLM's configuration, with its field names and meanings, as pydantic models.

Plain data: nothing here starts Ray, so configs are checked (and their errors shown) before any
deployment is attempted.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from lmserve.engine.args import create_engine_config

# Serve's default of 5 requests in flight per replica would throttle a model that batches
_DEFAULT_DEPLOYMENT = {"max_ongoing_requests": 64, "health_check_period_s": 10}


class ModelLoadingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str  # the name clients send as `model`
    model_source: str | None = None  # a path, a .gguf file or an HF id; default: model_id


class LoraConfig(BaseModel):
    """Adapters served as `model_id:adapter`, read from `dynamic_lora_loading_path/adapter` (a
    local directory of PEFT adapters) by the replica a request lands on. Serve's multiplexing
    keeps each replica's most recently used `max_num_adapters_per_replica` loaded and sends an
    adapter's requests to replicas that hold it."""

    model_config = ConfigDict(extra="forbid")
    dynamic_lora_loading_path: str | None = None
    max_num_adapters_per_replica: int = 16


class PlacementGroupConfig(BaseModel):
    """Where a replica's resources are reserved: Serve's placement_group_bundles/_strategy. The
    first bundle holds the replica actor itself."""

    model_config = ConfigDict(extra="forbid")
    bundles: list[dict[str, float]] = Field(min_length=1)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"


def _engine_arg_names() -> set[str]:
    return {
        name
        for name, p in inspect.signature(create_engine_config).parameters.items()
        if p.kind == p.KEYWORD_ONLY
    } | _SERVING_ARGS


# Server arguments taken from engine_kwargs, as vLLM takes them from its engine arguments: the
# queue limits apply in each replica's admission (a request is turned away before it is
# templated); the router sends SSE keep-alive pings at the smallest interval its models ask,
# and takes bodies up to the largest max_request_body_mb any of them allows.
_SERVING_ARGS = {
    "max_num_queued_reqs",
    "max_num_queued_tokens",
    "sse_keep_alive_interval",
    "max_request_body_mb",
    "max_waiting_time_s",
    "max_audio_file_mb",
    "max_audio_duration_s",
}
_SECONDS_OR_MB = {
    "sse_keep_alive_interval",
    "max_request_body_mb",
    "max_waiting_time_s",
    "max_audio_file_mb",
    "max_audio_duration_s",
}


class LLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_loading_config: ModelLoadingConfig
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    deployment_config: dict[str, Any] = Field(default_factory=dict)
    accelerator_type: str | None = None  # a Ray accelerator resource; CPU when unset
    runtime_env: dict[str, Any] | None = None
    placement_group_config: PlacementGroupConfig | None = None
    lora_config: LoraConfig | None = None
    # each replica's engine metrics on Ray's Prometheus port, as `ray_lmserve_*`
    log_engine_metrics: bool = True
    # lmserve's own: how long a replica waits for its engine to load before it fails (and Serve
    # retries it elsewhere) rather than hanging
    engine_start_timeout_s: PositiveFloat = 600.0

    @field_validator("engine_kwargs")
    @classmethod
    def _known_engine_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - _engine_arg_names())
        if unknown:
            raise ValueError(
                f"unknown engine_kwargs {unknown}; lmserve engine arguments are "
                f"{', '.join(sorted(_engine_arg_names()))}"
            )
        for name in _SERVING_ARGS & set(value):
            number = value[name]
            if name in _SECONDS_OR_MB:
                if isinstance(number, bool) or not isinstance(number, int | float) or number <= 0:
                    raise ValueError(f"engine_kwargs {name} must be a positive number")
            elif isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ValueError(f"engine_kwargs {name} must be a positive integer")
        return value

    def get_serve_options(self, name_prefix: str = "LLMServer:") -> dict[str, Any]:
        """The Serve deployment options of this model's replicas, as Ray Serve LLM's method of
        this name gives them: deployment_config over lmserve's defaults, the runtime_env and
        accelerator as actor options, placement bundles, and the name.

        A CPU replica reserves Serve's default of one CPU unless `ray_actor_options.num_cpus`
        says otherwise; Ray sets the replica's OMP_NUM_THREADS from it, so its engine computes
        on as many threads as it reserves."""
        options: dict[str, Any] = {**_DEFAULT_DEPLOYMENT, **self.deployment_config}
        actor_options = dict(options.get("ray_actor_options") or {})
        if self.runtime_env is not None:
            actor_options.setdefault("runtime_env", self.runtime_env)
        if self.accelerator_type is not None:
            resources = dict(actor_options.get("resources") or {})
            resources.setdefault(f"accelerator_type:{self.accelerator_type}", 0.001)
            actor_options["resources"] = resources
            actor_options.setdefault("num_gpus", 1)
        if actor_options:
            options["ray_actor_options"] = actor_options
        if self.placement_group_config is not None:
            options["placement_group_bundles"] = self.placement_group_config.bundles
            options["placement_group_strategy"] = self.placement_group_config.strategy
        elif self.tensor_parallel_size > 1:
            # one bundle per rank, the replica (rank 0) in the first: its other ranks are
            # processes it starts on its own node, so the bundles pack onto one node
            options["placement_group_bundles"] = [
                self._rank_bundle(actor_options)
            ] * self.tensor_parallel_size
            options["placement_group_strategy"] = "STRICT_PACK"
        options["name"] = name_prefix + self.model_id.replace("/", "--")
        return options

    @property
    def tensor_parallel_size(self) -> int:
        return int(self.engine_kwargs.get("tensor_parallel_size", 1))

    def _rank_bundle(self, actor_options: dict[str, Any]) -> dict[str, float]:
        """What one tensor-parallel rank reserves: the replica actor's CPUs (one by default),
        its GPU and accelerator when it has them."""
        bundle = {"CPU": float(actor_options.get("num_cpus", 1))}
        if actor_options.get("num_gpus"):
            bundle["GPU"] = float(actor_options["num_gpus"])
        bundle.update(actor_options.get("resources") or {})
        return bundle

    @property
    def engine_args(self) -> dict[str, Any]:
        """engine_kwargs for the engine, with LoRA turned on when the config serves adapters."""
        args = {k: v for k, v in self.engine_kwargs.items() if k not in _SERVING_ARGS}
        if self.lora_config is None:
            return args
        return {"enable_lora": True, **args}

    @property
    def serving_args(self) -> dict[str, Any]:
        """engine_kwargs that the HTTP side applies (queue limits, SSE keep-alive)."""
        return {k: v for k, v in self.engine_kwargs.items() if k in _SERVING_ARGS}

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    @property
    def model_source(self) -> str:
        return self.model_loading_config.model_source or self.model_id


class LLMServingArgs(BaseModel):
    """`{"llm_configs": [LLMConfig | dict | "path/to/model.yaml", ...]}`, as in Ray Serve LLM."""

    model_config = ConfigDict(extra="forbid")
    llm_configs: list[LLMConfig]

    @field_validator("llm_configs", mode="before")
    @classmethod
    def _load_files(cls, value: Any) -> Any:
        return [_read_yaml(item) if isinstance(item, str | Path) else item for item in value]

    @field_validator("llm_configs")
    @classmethod
    def _unique_ids(cls, value: list[LLMConfig]) -> list[LLMConfig]:
        ids = [c.model_id for c in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        if not ids:
            raise ValueError("llm_configs is empty: give at least one model")
        return value


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"model config file {path} does not exist") from None
