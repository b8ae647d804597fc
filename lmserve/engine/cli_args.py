"""The engine's command-line flags (vLLM's names and meanings), shared by `lmserve serve`,
`lmserve chat` and the benchmarks, and the keyword arguments of `create_engine_config` they
give."""

from __future__ import annotations

import argparse
from typing import Any

from lmserve.config import REASONING_MARKERS, STRUCTURED_OUTPUT_BACKENDS
from lmserve.engine.args import (
    ATTENTION_BACKENDS,
    DTYPES,
    LOAD_FORMATS,
    METRICS_PREFIXES,
    QUANTIZATIONS,
)
from lmserve.pooling.config import CONVERTS, RUNNERS, TASKS

MODEL_HELP = (
    "HF model directory, .gguf file, or HF id in the local cache "
    "(default: the bundled SmolLM2-135M-Instruct)"
)


def add_engine_cli_args(parser: argparse.ArgumentParser) -> None:
    """The engine arguments, with vLLM's flag names and meanings (the model is the caller's)."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=list(DTYPES),
        help="weights and activations dtype; auto = float32 on CPU (a .gguf model's weights "
        "kept in their blocks: --quantization gguf), the config's dtype on CUDA; float32 on a "
        ".gguf model dequantizes its weights (the exact reference, 4-8x the memory)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument(
        "--runner",
        default="auto",
        choices=list(RUNNERS),
        help="generate (text out) or pooling (embeddings or class probabilities out: "
        "/v1/embeddings, /pooling, /classify, /score, /rerank, LLM.embed/classify/score); auto "
        "picks pooling for encoders (BERT, RoBERTa, XLM-R: *Model and "
        "*ForSequenceClassification) and decoders' *ForSequenceClassification checkpoints, "
        "generate otherwise. Without a model, "
        "--runner pooling serves the bundled all-MiniLM-L6-v2",
    )
    parser.add_argument(
        "--convert",
        default="auto",
        choices=list(CONVERTS),
        help="what the pooling runner makes of the model: embed (a pooled, normalized hidden "
        "state; a decoder such as Qwen2ForCausalLM pools its last token) or classify (the "
        "checkpoint's *ForSequenceClassification head); auto picks from the architecture",
    )
    parser.add_argument(
        "--task",
        default=None,
        choices=list(TASKS),
        help="vLLM's older spelling of --runner/--convert: generate; embed or reward (pooling, "
        "convert embed); classify or score (pooling, convert classify)",
    )
    parser.add_argument(
        "--pooler-config",
        default=None,
        help='the pooling runner\'s pooler as JSON, e.g. \'{"pooling_type": "MEAN", '
        '"normalize": true}\': pooling_type (MEAN, CLS, LAST or ALL), normalize, activation '
        "(classify: probabilities, else logits), dimensions (a Matryoshka model's default "
        "size); default: the model's sentence-transformers config, else CLS for an encoder and "
        "LAST for a decoder, embeddings normalized",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=256, help="most requests running at once"
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="most tokens computed per step; longer prompts are prefilled in chunks "
        "(default 512 on CPU, 2048 on CUDA and for pooling models; a pooling prompt is never "
        "split, so a step holds at least max_model_len)",
    )
    parser.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="prefill long prompts in chunks beside running decodes (on, as in vLLM); "
        "--no-enable-chunked-prefill raises the step's token budget to the context length, so "
        "every prompt is prefilled in one step",
    )
    parser.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV cache of shared prompt prefixes",
    )
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    parser.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=None,
        help="KV cache size in GiB (CPU default 2; on CUDA it overrides --gpu-memory-utilization)",
    )
    parser.add_argument(
        "--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides memory)"
    )
    parser.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="fraction of GPU memory for weights, activations and KV cache",
    )
    parser.add_argument(
        "--load-format",
        default="auto",
        choices=list(LOAD_FORMATS),
        help="dummy = random weights with the model's real shapes (benchmarks)",
    )
    parser.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=list(QUANTIZATIONS),
        help="int8: quantize the linear layers at load time (weights per output channel, "
        "activations per token) for ~2-4x faster CPU decoding and ~1.7x faster embedding; "
        "close to, not exactly, the unquantized model's outputs. int4: weight-only, groups of "
        "32 weights with a scale and a minimum (GGUF's Q4_1; the LM head Q8_0), float32 "
        "activations, any model; a sixth of float32's weight memory. gguf (a .gguf model only): "
        "keep the file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K weights in their blocks (other "
        "types are dequantized), a fraction of float32's memory, the float32 model's outputs "
        "up to summation order; the default for a .gguf model on CPU with dtype auto. gguf_q8: "
        "gguf with decode rows quantized to int8 per 32 values and integer dot products, as "
        "llama.cpp computes (not the float32 outputs)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for unseeded sampling")
    parser.add_argument(
        "--enable-prompt-embeds",
        action="store_true",
        help="accept prompts as embeddings (`prompt_embeds`: a base64 torch.save'd [tokens, "
        "hidden_size] tensor) in place of text or token ids",
    )
    parser.add_argument(
        "--limit-mm-per-prompt",
        default=None,
        help="most media items of each kind in one prompt, as JSON: '{\"image\": 4}' "
        "(default: 999 each); more is a 400",
    )
    parser.add_argument(
        "--hf-overrides",
        default=None,
        help="config.json keys to replace, as JSON: '{\"num_hidden_layers\": 4}' with "
        "--load-format dummy cuts a shape to a few layers for a benchmark; real weights must "
        "still match the changed config",
    )
    parser.add_argument(
        "--speculative-config",
        default=None,
        help='speculative decoding, as JSON: \'{"method": "ngram", '
        '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
        "guesses the next tokens from earlier text that ended like the last few tokens and "
        "checks the guesses in one forward pass: faster when outputs repeat their context "
        "(code edits, summaries, extraction), the same greedy tokens always. "
        '\'{"model": DRAFT, "num_speculative_tokens": 4}\' has a smaller model of the same '
        "vocabulary guess greedily instead (a .gguf draft keeps its quantized blocks; "
        '"quantization" picks another); sampled outputs keep the model\'s distribution. '
        "Requests with penalties or structured outputs decode without it",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks one engine's model is split across (vLLM's tensor parallelism): each "
        "holds a share of every layer's heads and MLP width and of the vocabulary, in its own "
        "process, with an equal share of the CPU's cores; CPU (gloo) and Llama-family models "
        "for now, a size that divides the attention heads",
    )
    parser.add_argument(
        "--otlp-traces-endpoint",
        default=None,
        help="send one OpenTelemetry span per request (`llm_request`, with queue, prefill, "
        "decode, time-to-first-token and token-count attributes as vLLM's) to this OTLP "
        "collector, e.g. http://localhost:4317; a client's W3C traceparent header parents "
        "it. gRPC unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per streamed chunk: 1 sends each token as it is made; N sends the first at "
        "once, then every N tokens, then the rest at the end: less server work per token on a "
        "small machine, coarser streaming. A request's `stream_interval` may ask for more, "
        "not fewer",
    )
    parser.add_argument(
        "--kv-events-config",
        default=None,
        help='publish KV-cache events, as JSON: \'{"enable_kv_cache_events": true, '
        '"publisher": "zmq", "topic": "kv-events"}\' sends BlockStored / BlockRemoved / '
        "AllBlocksCleared batches in vLLM's format on a ZMQ PUB socket (endpoint, default "
        'tcp://*:5557; "replay_endpoint" for a ROUTER that resends missed batches), for '
        "cache-aware routers",
    )
    parser.add_argument(
        "--data-parallel-size",
        "-dp",
        type=int,
        default=1,
        help="engine cores behind this one server, each a process with its own copy of the "
        "model and its own KV cache (on CPU, each takes an equal share of the cores): requests "
        "go to the least busy, or to the one whose prefix cache holds their prompt's start",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accepted for vLLM compatibility: lmserve runs only its own model code, never "
        "code shipped with a checkpoint",
    )
    parser.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="a directory whose files requests may name as file:// media URLs (default: none; "
        "only trusted clients should have it)",
    )
    parser.add_argument(
        "--allowed-media-domains",
        nargs="+",
        default=None,
        metavar="HOST",
        help="the only hosts http(s) media URLs may name, private addresses allowed for them "
        "(default: any host with public addresses only: never loopback, the private network "
        "or cloud metadata)",
    )
    parser.add_argument(
        "--max-logprobs",
        type=int,
        default=20,
        help="most logprobs / top_logprobs / prompt_logprobs a request may ask for",
    )
    parser.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", *ATTENTION_BACKENDS],
        help="paged attention kernels: auto = triton on CUDA; on CPU, cpu (C++ kernels built at first "
        "use, float32) where the model's attention fits them, else torch_ref (plain torch, the "
        "reference)",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every step eagerly: no CUDA graphs for decode batches (CUDA only; saves the "
        "capture time and memory at startup, costs per-step launch overhead)",
    )
    parser.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters (PEFT format) on top of the base model; requests pick one by "
        "its name (see --lora-modules). Decode steps holding an adapter run without CUDA graphs",
    )
    parser.add_argument(
        "--enable-sleep-mode",
        action="store_true",
        help="allow putting the idle engine to sleep: level 1 frees the KV cache (on CUDA the "
        "weights move to host memory), level 2 frees the weights too (reloaded on wake-up). "
        "Offline: LLM.sleep() / wake_up(); served: POST /sleep, /wake_up, GET /is_sleeping, "
        "with VLLM_SERVER_DEV_MODE=1",
    )
    parser.add_argument(
        "--max-loras",
        type=int,
        default=1,
        help="most distinct LoRA adapters in one batch; requests for others wait their turn",
    )
    parser.add_argument(
        "--max-lora-rank", type=int, default=16, help="largest adapter rank that can be loaded"
    )
    parser.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept loaded in host memory (default: --max-loras); others reload from disk",
    )
    parser.add_argument(
        "--structured-outputs-backend",
        "--structured-outputs-config.backend",  # vLLM's spelling
        dest="structured_outputs_backend",
        default="auto",
        choices=list(STRUCTURED_OUTPUT_BACKENDS),
        help="grammar engine for response_format, guided_* and tool calls; auto = xgrammar, or "
        "llguidance for constraints xgrammar cannot enforce",
    )
    parser.add_argument(
        "--metrics-prefix",
        default="lmserve",
        choices=list(METRICS_PREFIXES),
        help="the prefix of the Prometheus series on /metrics: lmserve:* or, for dashboards and "
        "autoscalers written for vLLM, vllm:*",
    )
    parser.add_argument(
        "--show-hidden-metrics-for-version",
        default=None,
        help="accepted for vLLM compatibility: no lmserve metric is hidden",
    )
    parser.add_argument(
        "--reasoning-parser",
        default=None,
        choices=list(REASONING_MARKERS),
        help="split a reasoning model's thinking into reasoning_content: deepseek_r1, qwen3 "
        "(<think> tags), openai (gpt-oss's analysis channel); output constraints then apply "
        "only after the thinking ends",
    )


def engine_kwargs_from_cli(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `LLM` / `create_engine_config` from parsed engine flags."""
    return dict(
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        block_size=args.block_size,
        kv_cache_memory_gb=args.kv_cache_memory_gb,
        num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        load_format=args.load_format,
        quantization=args.quantization,
        seed=args.seed,
        max_logprobs=args.max_logprobs,
        enable_prompt_embeds=args.enable_prompt_embeds,
        structured_outputs_backend=args.structured_outputs_backend,
        attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager,
        enable_sleep_mode=args.enable_sleep_mode,
        reasoning_parser=args.reasoning_parser,
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        enable_chunked_prefill=args.enable_chunked_prefill,
        metrics_prefix=args.metrics_prefix,
        show_hidden_metrics_for_version=args.show_hidden_metrics_for_version,
        runner=args.runner,
        convert=args.convert,
        task=args.task,
        pooler_config=args.pooler_config,
        limit_mm_per_prompt=args.limit_mm_per_prompt,
        allowed_local_media_path=args.allowed_local_media_path,
        allowed_media_domains=args.allowed_media_domains,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        trust_remote_code=args.trust_remote_code,
        hf_overrides=args.hf_overrides,
        speculative_config=args.speculative_config,
        kv_events_config=args.kv_events_config,
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        stream_interval=args.stream_interval,
    )
