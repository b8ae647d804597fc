"""Host <-> device copies for the hot path, so a CUDA step never makes the host wait mid-step.

A copy from pageable host memory waits for the stream to drain first, so each step's small
inputs (token ids, positions, block tables, sampling parameters) would stall the host behind the
GPU's queued work. Staging them in pinned memory and copying with `non_blocking` keeps the
host queueing ahead; torch's caching host allocator reuses the pinned blocks once their copies
have run. The only wait is `to_host`, once a step, for the sampled ids. On CPU both are no-ops:
numpy arrays are wrapped, not copied.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """`x` on `device`, from pinned memory without a wait when that is a GPU. On CPU a numpy
    array comes back as a tensor sharing its memory."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """All of `tensors` on the CPU after one wait for the stream, however many there are."""
    if not any(t.device.type == "cuda" for t in tensors):
        return list(tensors)
    out = [t.to("cpu", non_blocking=True) for t in tensors]  # pinned destinations
    torch.cuda.current_stream(next(t.device for t in tensors if t.is_cuda)).synchronize()
    return out


def float32_bytes(x: torch.Tensor) -> bytes:
    """`x` as the float32 bytes that carry tensors between the frontend and the core (prompt
    embeddings in, pooled outputs back): bytes on the wire, never lists of floats."""
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def float32_tensor(data: bytes, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The tensor `float32_bytes` wrote (a writable copy: the bytes are immutable)."""
    return torch.frombuffer(bytearray(data), dtype=torch.float32).view(*shape)
