"""User-facing engine arguments (vLLM's names) -> a validated EngineConfig.

This is where the model directory is resolved, the device probed and config.json read, so that
`lmserve.config` itself stays plain data that any layer may import.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from lmserve.config import (
    REASONING_MARKERS,
    CacheConfig,
    DraftConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ObservabilityConfig,
    SchedulerConfig,
    StructuredOutputConfig,
    default_cache_dir,
    otlp_traces_protocol,
)
from lmserve.kernels import cpu_ops
from lmserve.kv_events.config import parse_kv_events_config
from lmserve.layers.rotary import LONGROPE_KINDS, scaling_kind
from lmserve.layers.tensor_parallel import check_divisible
from lmserve.models.registry import tensor_parallel_architectures
from lmserve.models.source import (
    DEFAULT_MODEL,
    DEFAULT_POOLING_MODEL,
    default_pooling_model,
    resolve_model_dir,
)
from lmserve.pooling.config import (
    read_sentence_transformers,
    resolve_pooler,
    resolve_runner,
)
from lmserve.spec_decode.config import SpeculativeConfig, parse_speculative_config

LOAD_FORMATS = ("auto", "safetensors", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("cpu", "torch_ref", "triton")
QUANTIZATIONS = ("int8", "int4", "gguf", "gguf_q8")
METRICS_PREFIXES = ("lmserve", "vllm")

logger = logging.getLogger(__name__)


def create_engine_config(
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
    max_logprobs: int = 20,
    enable_prompt_embeds: bool = False,
    cache_dir: str | os.PathLike | None = None,
    structured_outputs_backend: str = "auto",
    reasoning_parser: str | None = None,
    attention_backend: str = "auto",
    quantization: str | None = None,
    enforce_eager: bool = False,
    enable_sleep_mode: bool = False,
    enable_lora: bool = False,
    max_loras: int = 1,
    max_lora_rank: int = 16,
    max_cpu_loras: int | None = None,
    enable_chunked_prefill: bool = True,
    served_model_name: str | list[str] | None = None,
    metrics_prefix: str = "lmserve",
    show_hidden_metrics_for_version: str | None = None,
    runner: str = "auto",
    convert: str = "auto",
    task: str | None = None,
    pooler_config: dict[str, Any] | str | None = None,
    limit_mm_per_prompt: dict[str, int] | str | None = None,
    allowed_local_media_path: str | os.PathLike | None = None,
    allowed_media_domains: list[str] | None = None,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    trust_remote_code: bool = False,
    hf_overrides: dict[str, Any] | str | None = None,
    speculative_config: dict[str, Any] | str | None = None,
    kv_events_config: dict[str, Any] | str | None = None,
    otlp_traces_endpoint: str | None = None,
    stream_interval: int = 1,
) -> EngineConfig:
    """Build from user-facing arguments (vLLM's names); resolves the model directory.
    (`show_hidden_metrics_for_version` is vLLM's; no lmserve metric is hidden.
    `trust_remote_code` is vLLM's too: lmserve runs only its own model code, never a
    checkpoint's, so it changes nothing.)"""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {tensor_parallel_size}")
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be at least 1 (token), got {stream_interval}")
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be at least 1, got {data_parallel_size}")
    if metrics_prefix not in METRICS_PREFIXES:
        raise ValueError(
            f"metrics_prefix must be one of {METRICS_PREFIXES}, got {metrics_prefix!r}"
        )
    if isinstance(served_model_name, list):  # vLLM's list: the first names the metrics
        served_model_name = served_model_name[0] if served_model_name else None
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if reasoning_parser is not None and reasoning_parser not in REASONING_MARKERS:
        raise ValueError(
            f"reasoning_parser must be one of {', '.join(REASONING_MARKERS)}, got {reasoning_parser!r}"
        )
    start, end = REASONING_MARKERS.get(reasoning_parser or "", (None, None))
    structured_output = StructuredOutputConfig(structured_outputs_backend, start, end)
    device = _resolve_device(device)
    _check_quantization_name(quantization, device)
    if attention_backend != "auto" and attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attention_backend must be auto or one of {ATTENTION_BACKENDS}, "
            f"got {attention_backend!r}"
        )
    pooling_wanted = (
        runner == "pooling" or convert != "auto" or (task is not None and task != "generate")
    )
    if model is None and pooling_wanted:
        model = default_pooling_model()
        served_model_name = served_model_name or DEFAULT_POOLING_MODEL
    path = resolve_model_dir(model, Path(cache_dir) if cache_dir else default_cache_dir())
    hf_config = _with_decoding_rules(json.loads((path / "config.json").read_text()), path)
    hf_config = _with_text_config(_overridden(hf_config, _hf_overrides(hf_overrides)))
    architecture = (hf_config.get("architectures") or ["<missing>"])[0]
    resolved = resolve_runner(runner, convert, task, architecture)
    runner = resolved.runner
    pooler = None
    if resolved.convert is not None:
        pooler = resolve_pooler(pooler_config, path, architecture, resolved.convert)
        hidden = hf_config.get("hidden_size", 0)
        if pooler.dimensions is not None and pooler.dimensions > hidden:
            raise ValueError(f"pooler dimensions must be at most {hidden}, got {pooler.dimensions}")
    model_max_len = _model_max_len(hf_config)
    layout = read_sentence_transformers(path) if runner == "pooling" else None
    if layout is not None and layout.max_seq_length:  # the longest input it was trained on
        model_max_len = min(model_max_len, layout.max_seq_length)
    if max_model_len is None:
        max_model_len = model_max_len
    elif max_model_len > model_max_len:
        raise ValueError(
            f"max_model_len={max_model_len} exceeds the model's limit of {model_max_len} tokens"
        )
    hf_config = _with_longrope_choice(hf_config, max_model_len)
    quantization = _checked_quantization(quantization, path, dtype, device, runner, load_format)
    model_config = ModelConfig(
        model=model or DEFAULT_MODEL,
        path=path,
        hf_config=hf_config,
        dtype=_resolve_dtype(dtype, hf_config, device),
        load_format=load_format,
        max_model_len=max_model_len,
        seed=seed,
        max_logprobs=max_logprobs,
        enable_prompt_embeds=enable_prompt_embeds,
        quantization=quantization,
        limit_mm_per_prompt=_mm_limits(limit_mm_per_prompt),
        allowed_local_media_path=_media_dir(allowed_local_media_path),
        allowed_media_domains=tuple(d.lower() for d in allowed_media_domains)
        if allowed_media_domains
        else None,
    )
    if "vision_config" in hf_config and enable_lora:
        raise ValueError(
            "LoRA on a vision-language model is not supported yet: leave out enable_lora"
        )
    if max_num_batched_tokens is None:
        max_num_batched_tokens = _default_batched_tokens(device, runner)
    if model_config.num_encoder_tokens:
        # A decoder prompt is the same few tokens for every audio: its KV depends on the audio
        # through cross-attention, so no request may reuse another's (vLLM's rule too).
        enable_prefix_caching = False
        enforce_eager = True  # decode graphs hold decoder-only models
        if quantization is not None:  # measured: bench transcribe, 12 windows, the same time
            raise ValueError(
                f"quantization={quantization!r} does not speed up Whisper (its time goes to "
                "attention over the 1,500 encoder states, not to linear layers): leave it unset"
            )
    if not enable_chunked_prefill or runner == "pooling":
        # as vLLM: a step must hold any whole prompt (an encoder's is never split)
        max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    requested_backend = attention_backend
    attention_backend = _resolve_attention_backend(attention_backend, model_config, device)
    speculative = parse_speculative_config(
        _json_object(
            speculative_config,
            "speculative_config",
            '{"method": "ngram", "num_speculative_tokens": 4}',
        )
    )
    if speculative is not None and (runner == "pooling" or model_config.num_encoder_tokens):
        what = "a pooling model" if runner == "pooling" else "an encoder-decoder model"
        raise ValueError(
            f"speculative decoding is for decoder-only generation, not {what}: "
            "leave out speculative_config"
        )
    kv_events = parse_kv_events_config(
        _json_object(
            kv_events_config,
            "kv_events_config",
            '{"enable_kv_cache_events": true, "publisher": "zmq", "topic": "kv-events"}',
        )
    )
    if kv_events is not None and runner == "pooling":
        raise ValueError("a pooling model keeps no prefix cache: leave out kv_events_config")
    if tensor_parallel_size > 1:
        _check_tensor_parallel(
            tensor_parallel_size,
            model_config,
            device,
            runner=runner,
            unsupported={
                "enable_sleep_mode": enable_sleep_mode,
                "a draft model (speculative_config's model)": bool(
                    speculative is not None and speculative.uses_draft_model
                ),
            },
        )
    draft = None
    if speculative is not None and speculative.uses_draft_model:
        draft = _draft_config(
            speculative,
            model_config,
            Path(cache_dir) if cache_dir else default_cache_dir(),
            device,
            requested_backend,
        )
    return EngineConfig(
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
        structured_output=structured_output,
        device=device,
        attention_backend=attention_backend,
        # with LoRA, decode steps holding an adapter run eagerly (the runner decides per step)
        enforce_eager=enforce_eager,
        enable_sleep_mode=enable_sleep_mode,
        lora=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None,
        observability=ObservabilityConfig(
            served_model_name,
            metrics_prefix,
            otlp_traces_endpoint,
            otlp_traces_protocol(),
        ),
        runner=runner,
        pooler=pooler,
        speculative=speculative,
        draft=draft,
        data_parallel_size=data_parallel_size,
        tensor_parallel_size=tensor_parallel_size,
        kv_events=kv_events,
        stream_interval=stream_interval,
    )


def _check_tensor_parallel(
    size: int, model: ModelConfig, device: str, runner: str, unsupported: dict[str, bool]
) -> None:
    """Raise, saying what to change, where `size` ranks cannot run this engine (yet)."""
    if device != "cpu":
        raise ValueError(
            "tensor_parallel_size > 1 runs on CPU (gloo) for now; on CUDA leave it at 1"
        )
    if runner != "generate" or model.architecture not in tensor_parallel_architectures():
        raise ValueError(
            f"tensor_parallel_size > 1 splits {', '.join(tensor_parallel_architectures())} "
            f"for generation; {model.architecture} ({runner}) runs with tensor_parallel_size=1"
        )
    if model.quantization not in (None, "int8"):
        raise ValueError(
            f"tensor_parallel_size > 1 splits float or int8 weights, not {model.quantization!r}: "
            "pass --quantization int8 or --dtype float32"
        )
    for name, used in unsupported.items():
        if used:
            raise ValueError(f"{name} does not work with tensor_parallel_size > 1 yet")
    check_divisible(model.hf_config, size)


def _draft_config(
    speculative: SpeculativeConfig,
    target: ModelConfig,
    cache_dir: Path,
    device: str,
    attention_backend: str,
) -> DraftConfig:
    """The draft model of `speculative`, read as the target is (a .gguf keeps its blocks on CPU
    unless its quantization says otherwise), checked to speak the target's vocabulary and to
    reach its max_model_len."""
    assert speculative.model is not None
    _check_quantization_name(speculative.quantization, device, "the draft's quantization")
    path = resolve_model_dir(speculative.model, cache_dir)
    hf_config = _with_text_config(json.loads((path / "config.json").read_text()))
    vocab = int(hf_config.get("vocab_size") or 0)
    if vocab != target.vocab_size:
        raise ValueError(
            f"the draft model {speculative.model} has a vocabulary of {vocab} tokens, the "
            f"target {target.vocab_size}: a draft must share the target's tokenizer"
        )
    if _model_max_len(hf_config) < target.max_model_len:
        raise ValueError(
            f"the draft model {speculative.model} reaches {_model_max_len(hf_config)} tokens, "
            f"less than max_model_len={target.max_model_len}: lower --max-model-len"
        )
    quantization = _checked_quantization(
        speculative.quantization, path, "auto", device, "generate", target.load_format
    )
    model = ModelConfig(
        model=speculative.model,
        path=path,
        hf_config=hf_config,
        dtype=_resolve_dtype("auto", hf_config, device),
        load_format=target.load_format,
        max_model_len=target.max_model_len,
        seed=target.seed,
        quantization=quantization,
    )
    return DraftConfig(model, _resolve_attention_backend(attention_backend, model, device))


def _resolve_attention_backend(name: str, model: ModelConfig, device: str) -> str:
    """auto: triton on CUDA; on CPU the C++ kernels (`cpu`) where they handle the model's
    attention shape in float32, else plain torch."""
    fits_cpu = model.dtype == "float32" and cpu_ops.decode_attention_supported(
        model.num_heads, model.num_kv_heads, model.head_dim
    )
    if name == "auto":
        if device.startswith("cuda"):
            return "triton"
        return "cpu" if fits_cpu else "torch_ref"
    if name == "cpu" and device != "cpu":
        raise ValueError(f"attention_backend='cpu' runs on CPU only, not on {device}")
    if name == "cpu" and not fits_cpu:
        raise ValueError(
            "attention_backend='cpu' needs float32 and head_dim a multiple of 16 up to 256 with "
            f"at most 16 query heads per KV head (this model: {model.dtype}, head_dim "
            f"{model.head_dim}, {model.num_heads} / {model.num_kv_heads} heads); use torch_ref"
        )
    return name


def _default_batched_tokens(device: str, runner: str) -> int:
    """A CPU is compute-bound from a few dozen tokens a step, so bigger steps buy no throughput
    there, only longer waits: with 512, 16 clients arriving at once got their first token after
    0.93 s (p50) instead of 1.64 s, at the same output tok/s (docs/benchmarks.md). A GPU needs
    big steps to fill. A pooling step is a request's whole life, so it has no later tokens to
    delay, and bigger steps pool faster (1,000 sentences on all-MiniLM-L6-v2, 2 cores: 9.2 s
    at 512, 7.9 s at 2048)."""
    return 512 if device == "cpu" and runner == "generate" else 2048


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


def _with_decoding_rules(hf_config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Whisper's config with what HF's generate reads from generation_config.json to mask
    logits: the tokens suppressed always and at the first output, and the timestamp rules'
    tokens. The model applies them."""
    if hf_config.get("model_type") != "whisper":
        return hf_config
    generation_path = path / "generation_config.json"
    generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
    return {
        **hf_config,
        **{
            key: generation[key]
            for key in _DECODING_RULES
            if hf_config.get(key) is None and generation.get(key) is not None
        },
    }


def _media_dir(value: str | os.PathLike | None) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(value).resolve()
    if not path.is_dir():
        raise ValueError(f"allowed_local_media_path {str(value)!r} is not a directory")
    return path


def _mm_limits(value: dict[str, int] | str | None) -> dict[str, int]:
    """--limit-mm-per-prompt: JSON (or a dict, or vLLM's `image=1` form) of modality -> most
    items in one prompt."""
    if isinstance(value, str) and not value.lstrip().startswith("{"):  # vLLM's image=1,audio=0
        try:
            value = {k.strip(): int(v) for k, v in (item.split("=") for item in value.split(","))}
        except ValueError:
            raise ValueError(
                f"limit_mm_per_prompt is JSON or image=N[,audio=N], got {value!r}"
            ) from None
    elif isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"limit_mm_per_prompt is not JSON: {exc}") from None
    value = value or {}
    if not isinstance(value, dict) or not all(
        k in ("image", "audio") and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise ValueError(
            'limit_mm_per_prompt maps "image" / "audio" to a count of 0 or more, e.g. '
            f'{{"image": 4}}; got {value!r}'
        )
    return dict(value)


def _hf_overrides(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """--hf-overrides (vLLM's): config.json keys to replace, as JSON or a dict."""
    return dict(_json_object(value, "hf_overrides", '{"num_hidden_layers": 4}') or {})


def _check_quantization_name(
    quantization: str | None, device: str, what: str = "quantization"
) -> None:
    """A quantization lmserve has, asked for on CPU: checked before the model is read."""
    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"{what} must be one of {QUANTIZATIONS}, got {quantization!r}")
    if device != "cpu":
        raise ValueError(f"{what}={quantization!r} runs on CPU only; leave it unset on CUDA")


def _checked_quantization(
    quantization: str | None, path: Path, dtype: str, device: str, runner: str, load_format: str
) -> str | None:
    """The quantization a model loads with: the default where none is asked for (picked only
    where _check_gguf_blocks holds: not checked twice), else checked against what its kernels
    need."""
    if quantization is None:
        return _default_quantization(path, dtype, device, runner, load_format)
    if quantization in ("gguf", "gguf_q8"):
        _check_gguf_blocks(quantization, path, dtype, load_format, runner)
    elif quantization == "int4":
        _check_block_kernels(quantization, dtype, runner)
    return quantization


def _default_quantization(
    path: Path, dtype: str, device: str, runner: str, load_format: str
) -> str | None:
    """As vLLM: a .gguf model keeps its quantized blocks (`gguf`), here on CPU for generation,
    unless a dtype is asked for: `--dtype float32` is the dequantized model, the exact oracle."""
    from lmserve.models.gguf import blocks_unsupported, gguf_source

    if dtype != "auto" or device != "cpu" or runner != "generate" or load_format == "dummy":
        return None
    source = gguf_source(path)
    if source is None or blocks_unsupported(source) or not cpu_ops.available():
        return None
    logger.info(
        "a GGUF model on CPU: its weights stay in their quantized blocks (--quantization gguf); "
        "--dtype float32 loads them dequantized instead"
    )
    return "gguf"


def _check_gguf_blocks(
    quantization: str, path: Path, dtype: str, load_format: str, runner: str
) -> None:
    """quantization='gguf' / 'gguf_q8' read a GGUF file's blocks into float32 CPU kernels: say
    up front what else they need."""
    from lmserve.models.gguf import blocks_unsupported, gguf_source

    name = f"quantization={quantization!r}"
    source = gguf_source(path)
    if source is None or load_format == "dummy":
        raise ValueError(
            f"{name} keeps a .gguf file's weights quantized: give a .gguf model (and real "
            "weights, not load_format='dummy'), or use quantization='int8'"
        )
    unsupported = blocks_unsupported(source)
    if unsupported:
        raise ValueError(f"{name} does not load {unsupported} yet: use quantization='int8'")
    _check_block_kernels(quantization, dtype, runner)


def _check_block_kernels(quantization: str, dtype: str, runner: str) -> None:
    """What every path through the C++ block kernels (gguf, gguf_q8, int4) needs."""
    from lmserve.kernels import cpu_ops

    name = f"quantization={quantization!r}"
    if dtype not in ("auto", "float32"):
        raise ValueError(f"{name} computes in float32; leave dtype auto, not {dtype!r}")
    if runner != "generate":
        raise ValueError(f"{name} serves generative models only; leave it unset")
    if not cpu_ops.available():
        raise ValueError(
            f"{name} needs lmserve's C++ CPU kernels, which did not build here (see the "
            "warning above: install g++), or use quantization='int8'"
        )


def _json_object(
    value: dict[str, Any] | str | None, name: str, example: str
) -> dict[str, Any] | None:
    """A flag given as a JSON object (or, offline, a dict); errors name the flag and show
    `example`."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not JSON: {exc}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{name} is a JSON object, e.g. {example}; got {value!r}")
    return value


def _overridden(hf_config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The config with `overrides` applied; a smaller `num_hidden_layers` keeps the first layers'
    `layer_types`, so a benchmark of a model's first layers has those layers' kinds."""
    config = {**hf_config, **overrides}
    num_layers, kinds = config.get("num_hidden_layers"), config.get("layer_types")
    if "layer_types" not in overrides and isinstance(kinds, list) and isinstance(num_layers, int):
        config["layer_types"] = kinds[:num_layers]
    return config


def _with_longrope_choice(hf_config: dict[str, Any], max_model_len: int) -> dict[str, Any]:
    """A LongRoPE model (Phi-3 128k, Phi-3.5) turns with its long factors when the engine may run
    past the pretrained context, else with its short ones, for every request (vLLM's rule). HF
    switches as each sequence crosses that length, which would leave cached keys turned the
    other way; the two agree on every sequence when max_model_len is at most the pretrained
    context, and on prompts already past it otherwise."""
    for key in ("rope_scaling", "rope_parameters"):
        params = hf_config.get(key)
        if not isinstance(params, dict):
            continue
        if scaling_kind(params) not in LONGROPE_KINDS:
            continue
        original = int(
            params.get("original_max_position_embeddings")
            or hf_config.get("original_max_position_embeddings")
            or hf_config["max_position_embeddings"]
        )
        long_context = max_model_len > original
        logger.info(
            "LongRoPE: max_model_len %d %s the pretrained %d tokens: the %s factors for every "
            "request%s",
            max_model_len,
            "exceeds" if long_context else "is within",
            original,
            "long" if long_context else "short",
            f" (--max-model-len {original} for the short ones)" if long_context else "",
        )
        params = {**params, "original_max_position_embeddings": original}
        return {**hf_config, key: {**params, "long_context": long_context}}
    return hf_config


def _with_text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """A vision-language model's config with its language model's keys at the top: the KV
    cache, the limits and the language model are sized from those, as for a text model. The
    architecture stays the outer one; `text_config` and `vision_config` stay as they are."""
    text = hf_config.get("text_config")
    if not isinstance(text, dict) or not isinstance(hf_config.get("vision_config"), dict):
        return hf_config
    return {**hf_config, **text, "architectures": hf_config.get("architectures")}


_DECODING_RULES = (
    "suppress_tokens",
    "begin_suppress_tokens",
    "no_timestamps_token_id",
    "max_initial_timestamp_index",
)


def _model_max_len(hf_config: dict[str, Any]) -> int:
    """The longest context the model supports."""
    length = int(
        hf_config.get("max_position_embeddings") or hf_config.get("max_target_positions") or 2048
    )
    if hf_config.get("model_type") in ("roberta", "xlm-roberta"):  # positions start after pad
        length -= int(hf_config.get("pad_token_id", 1)) + 1
    return length
