import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmserve.worker.cpu_allocator import keep_freed_memory_mapped

# In a fresh process: where glibc puts a 16 MiB tensor (a fresh mmap, or the heap), and whether
# the heap shrinks back when it is freed. Either would page-fault it in again at the next step.
_PROBE = textwrap.dedent(
    """
    import ctypes, sys, torch
    from lmserve.worker.cpu_allocator import keep_freed_memory_mapped

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    if sys.argv[1] == "keep":
        assert keep_freed_memory_mapped()
    torch.empty(64 << 20)  # freed at once; like the engine's big buffers: always mmapped, adapts nothing
    mmapped = libc.mallinfo2().hblkhd
    x = torch.empty(4 << 20)
    in_mmap = libc.mallinfo2().hblkhd - mmapped
    heap = libc.mallinfo2().arena
    del x
    print(in_mmap >> 20, (heap - libc.mallinfo2().arena) >> 20)
    """
)


def _probe(mode: str) -> tuple[int, int]:
    """(MiB of the tensor in a fresh mmap, MiB the heap shrank by once it was freed)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    )
    in_mmap, shrunk = out.stdout.split()
    return int(in_mmap), int(shrunk)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_step_sized_temporaries_stay_in_the_heap() -> None:
    assert _probe("default") == (16, 0)  # glibc's default: a fresh mmap for every such tensor
    assert _probe("keep") == (0, 0)  # in the heap, and the heap keeps it once freed


def test_is_safe_to_call_twice() -> None:
    assert keep_freed_memory_mapped() == keep_freed_memory_mapped()


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages")
def test_the_kv_cache_is_advised_into_huge_pages() -> None:
    """Every whole 2 MiB page of the cache is marked for huge pages (VmFlags `hg`); whether the
    kernel finds free huge pages for them depends on the machine's memory, not on lmserve."""
    import torch

    from lmserve.config import ModelConfig
    from lmserve.worker.kv_cache import allocate_kv_caches

    hf_config = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 128}
    model = ModelConfig("tiny", Path("."), hf_config, "float32", "dummy", max_model_len=64)
    shape = (2, 4096, 2, 16, 64)  # 64 MiB: above the mmap threshold, so never reused heap
    (cache,) = allocate_kv_caches(model, shape, 16, torch.float32, torch.device("cpu"))
    assert not cache.any()
    huge = 2 << 20
    begin = -(-cache.data_ptr() // huge) * huge
    end = (cache.data_ptr() + cache.nbytes) // huge * huge
    advised = 0
    lo = hi = 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        field = line.split()[0]
        if "-" in field and not field.endswith(":"):  # a mapping's header: lo-hi perms ...
            lo, hi = (int(x, 16) for x in field.split("-"))
        elif field == "VmFlags:" and "hg" in line.split()[1:]:
            advised += max(0, min(hi, end) - max(lo, begin))  # madvise split the mapping
    assert advised == end - begin
