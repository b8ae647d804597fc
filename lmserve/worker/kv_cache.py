"""Size and allocate the physical KV cache: one tensor per layer in the attention backend's
layout, zero-filled so masked-out reads are finite (on CPU, in transparent huge pages)."""

from __future__ import annotations

import logging

import torch

from lmserve.config import CacheConfig, ModelConfig
from lmserve.worker.cpu_allocator import advise_huge_pages

logger = logging.getLogger(__name__)


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


def num_blocks_from_budget(
    model: ModelConfig,
    cache: CacheConfig,
    dtype: torch.dtype,
    budget_bytes: int,
    extra_per_block: int = 0,
) -> int:
    """Blocks that fit in `budget_bytes`; `extra_per_block`: what a block costs besides the
    model's own KV (a draft model's KV for the same tokens)."""
    per_block = bytes_per_block(model, cache.block_size, dtype) + extra_per_block
    num_blocks = budget_bytes // per_block
    if num_blocks < 2:
        raise ValueError(
            f"the KV cache budget of {budget_bytes / 2**30:.2f} GiB holds {num_blocks} blocks of "
            f"{per_block / 2**20:.1f} MiB; raise kv_cache_memory_gb (or gpu_memory_utilization)"
        )
    return int(num_blocks)


def cuda_kv_budget_bytes(cache: CacheConfig, device: torch.device) -> int:
    """gpu_memory_utilization of the GPU, minus what weights and a profiled forward already use."""
    free, total = torch.cuda.mem_get_info(device)
    peak = torch.cuda.max_memory_allocated(device)
    used_by_others = total - free - torch.cuda.memory_reserved(device)
    return int(total * cache.gpu_memory_utilization) - peak - used_by_others


def allocate_kv_caches(
    model: ModelConfig,
    shape: tuple[int, ...],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """`shape` is one layer's, from the backend's kv_cache_shape."""
    num_blocks = shape[1]
    caches = [torch.empty(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
    for cache in caches:
        if device.type == "cpu":
            advise_huge_pages(cache)  # before zero_() touches its pages
        cache.zero_()
    total = bytes_per_block(model, block_size, dtype) * num_blocks
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB",
        num_blocks,
        block_size,
        num_blocks * block_size,
        total / 2**30,
    )
    return caches
