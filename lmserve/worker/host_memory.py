"""Whether a model and its KV cache fit in the memory this process can still take (CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmserve.config import EngineConfig
from lmserve.models.memory import weight_bytes

_GB = 1 << 30


def available_bytes() -> int | None:
    """/proc/meminfo's MemAvailable, capped by a cgroup (v2 or v1) limit less its usage; None
    where neither can be read (not Linux)."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge v1 value: no limit
            limits.append(int(limit) - usage)
    return min(limits) if limits else None


def check_fits(config: EngineConfig) -> None:
    """Raise, naming what is needed and what is available, when the weights plus the KV cache
    budget are more than this host can still give; a GGUF loaded as float32 is told what
    `quantization="gguf"` would need."""
    weights = weight_bytes(config.model)
    if config.draft is not None and weights is not None:  # speculation's draft loads beside it
        draft = weight_bytes(config.draft.model)
        weights = None if draft is None else weights + draft
    available = available_bytes()
    if weights is None or available is None:
        return
    kv = config.cache.kv_cache_bytes if config.cache.num_kv_blocks is None else 0
    if weights + kv <= available:
        return
    model = config.model
    hint = "free memory, lower --kv-cache-memory-gb, or serve a smaller or more quantized model"
    if model.quantization not in ("gguf", "gguf_q8"):
        from lmserve.models.gguf import gguf_source

        if gguf_source(model.path) is not None:
            kept = weight_bytes(dataclasses.replace(model, quantization="gguf")) or 0
            hint = (
                f"keep its weights quantized with --quantization gguf (about "
                f"{(kept + kv) / _GB:.1f} GB with this KV cache; the default on CPU without "
                f"--dtype), or {hint}"
            )
    raise ValueError(
        f"{model.model} needs about {(weights + kv) / _GB:.1f} GB of memory "
        f"({weights / _GB:.1f} GB of {model.quantization or model.dtype} weights + "
        f"{kv / _GB:.1f} GB of KV cache), but {available / _GB:.1f} GB is available: {hint}"
    )
