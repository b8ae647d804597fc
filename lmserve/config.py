"""Frozen engine configuration, validated once; nothing else reads os.environ or config files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmserve.kv_events.config import KVEventsConfig
from lmserve.pooling.config import PoolerConfig
from lmserve.spec_decode.config import SpeculativeConfig

_DEFAULT_CPU_KV_CACHE_GB = 2.0
DEFAULT_MM_LIMIT = 999  # vLLM's default number of items per modality in one prompt


def default_cache_dir() -> Path:
    """Where converted GGUF checkpoints are kept: $LMSERVE_CACHE_DIR, else ~/.cache/lmserve."""
    root = os.environ.get("LMSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmserve"
    )
    return Path(root)


def otlp_traces_protocol() -> str:
    """The OTLP protocol OpenTelemetry's own variables name (grpc unless told otherwise)."""
    return (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    )


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
    max_logprobs: int = 20  # most logprobs / prompt_logprobs a request may ask for
    # "int8": dynamic W8A8 linears (CPU), quantized at load; "gguf" / "gguf_q8": a GGUF file's
    # linear weights kept in their blocks (layers/gguf_layers.py)
    quantization: str | None = None
    enable_prompt_embeds: bool = False  # prompts may come as embeddings instead of token ids
    # most items of each modality in one prompt ({"image": 4}); DEFAULT_MM_LIMIT where unset
    limit_mm_per_prompt: dict[str, int] = field(default_factory=dict)
    # where a request's media may come from: file:// only under this directory; http(s) only
    # to these hosts (then private ones too) when set, else to public addresses only
    allowed_local_media_path: Path | None = None
    allowed_media_domains: tuple[str, ...] | None = None

    @property
    def architecture(self) -> str:
        return (self.hf_config.get("architectures") or ["<missing>"])[0]

    @property
    def hidden_size(self) -> int:
        return int(self.hf_config.get("hidden_size") or self.hf_config["d_model"])

    @property
    def num_layers(self) -> int:
        """Layers with a KV cache: an encoder-decoder's decoder layers."""
        hf = self.hf_config
        return int(hf.get("num_hidden_layers") or hf["decoder_layers"])

    @property
    def num_heads(self) -> int:
        hf = self.hf_config
        return int(hf.get("num_attention_heads") or hf["decoder_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def num_encoder_tokens(self) -> int:
        """Encoder states a request's decoder cross-attends to (Whisper: 1,500 per 30 s
        window); 0 for a decoder-only model."""
        if self.hf_config.get("model_type") != "whisper":
            return 0
        return int(self.hf_config["max_source_positions"])

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
    # An explicit budget on any device (on CUDA it overrides gpu_memory_utilization, as vLLM's
    # kv_cache_memory_bytes does); on CPU it defaults to _DEFAULT_CPU_KV_CACHE_GB.
    kv_cache_memory_gb: float | None = None
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
    def kv_cache_bytes(self) -> int:
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


STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar", "guidance")
# --reasoning-parser name -> the texts that open and close the model's thinking
# (start, end) of each reasoning parser's thinking, as the engine finds them in token ids: the
# grammar of a structured output applies after the end (gpt-oss: once its final channel opens)
REASONING_MARKERS = {
    "deepseek_r1": ("<think>", "</think>"),
    "openai": ("<|start|>assistant", "<|channel|>final<|message|>"),
    "qwen3": ("<think>", "</think>"),
}


@dataclass(frozen=True)
class StructuredOutputConfig:
    """Which grammar backend enforces output constraints, and where a reasoning model's thinking
    ends (the grammar applies only after `reasoning_end`)."""

    backend: str = "auto"
    reasoning_start: str | None = None
    reasoning_end: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ValueError(
                f"structured outputs backend must be one of {', '.join(STRUCTURED_OUTPUT_BACKENDS)}"
                f", got {self.backend!r}"
            )


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (`enable_lora`): adapters a step may mix, and their largest rank."""

    max_loras: int = 1  # distinct adapters in one batch (each holds a slot of stacked weights)
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # adapters kept loaded in host memory; None = max_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras})"
            )


@dataclass(frozen=True)
class ObservabilityConfig:
    """How the engine names itself in metrics: the served name (vLLM's model_name label) and
    the series' prefix (`lmserve`, or `vllm` for dashboards written for vLLM)."""

    served_model_name: str | None = None
    metrics_prefix: str = "lmserve"
    # OpenTelemetry: where request spans go (None: not traced), and over which OTLP protocol
    otlp_traces_endpoint: str | None = None
    otlp_traces_protocol: str = "grpc"


@dataclass(frozen=True)
class DraftConfig:
    """Speculative decoding's draft model: loaded beside the target, with its own KV cache
    under the target's block tables (the same block ids), on its own attention backend."""

    model: ModelConfig
    attention_backend: str


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    structured_output: StructuredOutputConfig = field(default_factory=StructuredOutputConfig)
    device: str = "cpu"
    attention_backend: str = "torch_ref"  # torch_ref (CPU, the oracle) | triton (CUDA)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    enable_sleep_mode: bool = False  # sleep() / wake_up() free and restore the KV cache, weights
    lora: LoRAConfig | None = None  # None: LoRA adapters are not served
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    runner: str = "generate"  # "generate", or "pooling": prompts in, embeddings out
    pooler: PoolerConfig | None = None  # the pooling runner's pooler
    speculative: SpeculativeConfig | None = None  # None: one token per request per step
    draft: DraftConfig | None = None  # the speculative draft model, when one guesses
    # data parallel: engine cores behind one API server, each with its own KV cache; this
    # core's index among them (the API server's config keeps 0)
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    # tensor parallel: ranks that each hold a slice of every layer (worker processes beside
    # the core's, which is rank 0)
    tensor_parallel_size: int = 1
    kv_events: KVEventsConfig | None = None  # None: KV-cache events are not published
    # tokens per streamed snapshot at least (the first and the last go out at once): fewer,
    # larger chunks cost the server less per token
    stream_interval: int = 1
