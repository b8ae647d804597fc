"""Frozen engine configuration, validated once; nothing else reads os.environ or config files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_DTYPES = ("auto", "float32", "float16", "bfloat16")
_DEFAULT_CPU_KV_CACHE_GB = 2.0


def default_cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept: $LMSERVE_CACHE_DIR, else ~/.cache/lmserve."""
    root = os.environ.get("LMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmserve"
    )
    return Path(root)


@dataclass(frozen=True)
class ModelConfig:
    """The model to run: its local directory, parsed config.json and numerics."""

    model: str
    path: Path
    hf_config: dict[str, Any]
    dtype: str
    load_format: str
    max_model_len: int
    seed: int = 0

    @property
    def architecture(self) -> str:
        return (self.hf_config.get("architectures") or ["<missing>"])[0]

    @property
    def num_layers(self) -> int:
        return int(self.hf_config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(
            self.hf_config.get("head_dim") or self.hf_config["hidden_size"] // self.num_heads
        )

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    @property
    def has_tokenizer(self) -> bool:
        return any(
            (self.path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json")
        )


@dataclass(frozen=True)
class CacheConfig:
    """KV cache geometry: an explicit block count, or a memory budget it is sized from."""

    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gb: float | None = None  # CPU budget; default _DEFAULT_CPU_KV_CACHE_GB
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be at least 2, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    @property
    def cpu_kv_cache_bytes(self) -> int:
        return int((self.kv_cache_memory_gb or _DEFAULT_CPU_KV_CACHE_GB) * (1 << 30))


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: tokens computed in one forward pass and requests running at once."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"

    @classmethod
    def create(
        cls,
        model: str | None = None,
        *,
        dtype: str = "auto",
        load_format: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_gb: float | None = None,
        gpu_memory_utilization: float = 0.9,
        device: str = "auto",
        cache_dir: str | os.PathLike | None = None,
    ) -> EngineConfig:
        """Build from user-facing arguments (vLLM's names); resolves the model directory."""
        from lmserve.models.source import DEFAULT_MODEL, resolve_model_dir

        if load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {load_format!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        device = _resolve_device(device)
        path = resolve_model_dir(model, Path(cache_dir) if cache_dir else default_cache_dir())
        hf_config = json.loads((path / "config.json").read_text())
        model_max_len = _model_max_len(hf_config)
        if max_model_len is None:
            max_model_len = model_max_len
        elif max_model_len > model_max_len:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's limit of {model_max_len} tokens"
            )
        model_config = ModelConfig(
            model=model or DEFAULT_MODEL,
            path=path,
            hf_config=hf_config,
            dtype=_resolve_dtype(dtype, hf_config, device),
            load_format=load_format,
            max_model_len=max_model_len,
            seed=seed,
        )
        if max_num_batched_tokens is None:
            max_num_batched_tokens = 2048
        return cls(
            model=model_config,
            cache=CacheConfig(
                block_size=block_size,
                num_kv_blocks=num_kv_blocks,
                kv_cache_memory_gb=kv_cache_memory_gb,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                max_model_len=max_model_len,
            ),
            device=device,
        )


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: str, hf_config: dict[str, Any], device: str) -> str:
    """auto: float32 on CPU (exact, and fastest without bf16 hardware); the config's dtype on CUDA."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"
    configured = hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16"
    return "bfloat16" if configured == "float32" else configured


def _model_max_len(hf_config: dict[str, Any]) -> int:
    """The longest context the model supports; sliding-window attention caps it (not implemented)."""
    length = int(hf_config.get("max_position_embeddings") or 2048)
    window = hf_config.get("sliding_window")
    if window and hf_config.get("use_sliding_window", True):
        length = min(length, int(window))
    return length
