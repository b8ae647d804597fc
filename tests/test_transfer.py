"""Host <-> device copies: zero-copy on CPU; pinned, non-blocking and exact on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmserve.transfer import to_device, to_host

CPU = torch.device("cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_wraps_contiguous_arrays_without_copying() -> None:
    array = np.arange(6, dtype=np.int64)
    tensor = to_device(array, CPU)
    array[0] = 42
    assert tensor[0].item() == 42 and tensor.dtype == torch.int64


def test_cpu_takes_strided_arrays_and_tensors() -> None:
    array = np.arange(12, dtype=np.int32).reshape(3, 4)[:, 1:3]  # not contiguous
    assert to_device(array, CPU).tolist() == array.tolist()
    tensor = torch.ones(3)
    assert to_device(tensor, CPU) is tensor


def test_to_host_of_cpu_tensors_is_the_tensors() -> None:
    a, b = torch.zeros(2), torch.ones(3)
    out = to_host(a, b)
    assert out[0] is a and out[1] is b


@pytest.mark.gpu
@needs_gpu
def test_gpu_copies_are_exact_and_never_wait() -> None:
    """Inputs reach the device without a synchronizing copy; the one wait is to_host's."""
    cuda = torch.device("cuda")
    arrays = [np.arange(1000, dtype=np.int64), np.linspace(0, 1, 7, dtype=np.float32)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_device = [to_device(a, cuda) for a in arrays]
        doubled = [t * 2 for t in on_device]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    back = to_host(*doubled)
    for array, tensor in zip(arrays, back, strict=True):
        assert tensor.device == CPU and tensor.is_pinned()
        np.testing.assert_array_equal(tensor.numpy(), array * 2)


@pytest.mark.gpu
@needs_gpu
def test_gpu_staging_memory_can_be_reused_at_once() -> None:
    """A host array rewritten right after its copy was queued must not change the copy."""
    cuda = torch.device("cuda")
    big = torch.empty(4096, 4096, device=cuda)
    array = np.zeros(1 << 20, dtype=np.float32)
    torch.matmul(big, big)  # keeps the stream busy while the copy waits its turn
    copied = to_device(array, cuda)
    array[:] = 1.0
    (host,) = to_host(copied)
    assert float(host.sum()) == 0.0
