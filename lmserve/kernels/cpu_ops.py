"""C++ CPU kernels (`kernels/cpu/ops.cpp`; `decode_layers.cpp` chains them for a decode step),
compiled with the machine's C++ compiler at first use.

The build (~15 s) targets the SIMD capability torch reports for this CPU (AVX-512, AVX2, or
plain C++) with ATen's Vectorized types, and is kept in the lmserve cache per torch version and
capability; torch's extension builder rebuilds it when the source changes. Where it cannot
build (no compiler), `available()` says so once in the log and callers keep their plain-torch
paths, which give the same results, slower.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import torch

from lmserve.config import default_cache_dir

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name("cpu") / name for name in ("ops.cpp", "decode_layers.cpp")]
# The kernel's register tiles (ops.cpp: kMaxGroup, kMaxVectors x the narrowest SIMD width).
# what ATen's Vectorized needs for each capability (as torch's inductor compiles its C++)
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_MAX_GROUP = 16
_MAX_HEAD_DIM = 256
_HEAD_DIM_MULTIPLE = 16


def decode_attention_supported(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether `decode_attention` handles this attention shape (in float32)."""
    return (
        num_heads % num_kv_heads == 0
        and num_heads // num_kv_heads <= _MAX_GROUP
        and head_dim % _HEAD_DIM_MULTIPLE == 0
        and head_dim <= _MAX_HEAD_DIM
    )


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels take `x`: float32 on the CPU, and the kernels built."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


@functools.cache
def available() -> bool:
    """Build (or load the cached build of) the kernels; False, with a warning, if that fails."""
    from torch.utils import cpp_extension

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    # The instruction set of the capability, not -march=native: a build kept in a shared cache
    # must run on every machine that reports the same capability. No implicit FMA contraction:
    # the int8 passes must round exactly as the torch ops they replace.
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", f"-DCPU_CAPABILITY={capability}"]
    if capability in _ISA_FLAGS:
        flags += [f"-DCPU_CAPABILITY_{capability}", *_ISA_FLAGS[capability]]
    variant = capability
    if capability == "AVX512" and "avx512_vnni" in cpu_flags():
        # int8 dot products in one instruction (vpdpbusd), the same sums; its own build, as
        # an AVX-512 CPU without VNNI (Skylake) must not load it
        flags += ["-mavx512vnni"]
        variant += "-VNNI"
    name = "lmserve_cpu_ops"
    build_dir = default_cache_dir() / "cpu_kernels" / f"torch-{torch.__version__}-{variant}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build_dir)
        if not (build_dir / f"{name}.so").exists():
            logger.info("building lmserve's C++ CPU kernels into %s (once, ~15 s)", build_dir)
        cpp_extension.load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, no cache dir, a failed build: plain torch
        logger.warning(
            "lmserve's C++ CPU kernels did not build, so CPU attention and int8 layers run on "
            "plain torch (same results, slower). Install a C++ compiler (g++) to get them. "
            "Cause: %s",
            _first_error(exc),
        )
        return False
    return True


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is not there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def clear_stale_lock(build_dir: Path, max_age_s: float = 300.0) -> bool:
    """Remove the build lock a killed build left behind (torch would wait on it forever, and
    every later start with it): a build takes seconds, so a lock older than `max_age_s` has no
    builder. True if one was removed."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < max_age_s:
        return False
    logger.warning("removing %s, left %.0f s ago by an interrupted kernel build", lock, age)
    lock.unlink(missing_ok=True)
    return True


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    token_index: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """Attention of decode rows (one query each) over their paged keys, written into `out`;
    with `window`, over the last `window` keys only, with `soft_cap`, scores capped by
    soft_cap * tanh(s / soft_cap), and with `sinks` [num_heads], one more logit per head in the
    softmax's denominator.

    q, out: [num_tokens, num_heads, head_dim]; caches [num_blocks, kv_heads, block_size,
    head_dim]; block_table [rows, max_blocks] int32; seq_lens [rows] int32; token_index [rows]
    int64, the token of each row in q and out. float32; shapes per decode_attention_supported.
    """
    torch.ops.lmserve_cpu.decode_attention(
        q,
        key_cache,
        value_cache,
        block_table,
        seq_lens,
        token_index,
        out,
        scale,
        window or 0,
        soft_cap or 0.0,
        None if sinks is None else sinks.float().contiguous(),
    )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Copy k, v [num_tokens, kv_heads, head_dim] into head-major caches at the int64 slots."""
    torch.ops.lmserve_cpu.store_kv(k, v, key_cache, value_cache, slot_mapping)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of float32 [rows, cols]: (int8 values, [rows, 1] scales)."""
    return torch.ops.lmserve_cpu.quantize_rows(x)


def dequantize_(
    acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """int32 [rows, cols] -> float32 in the same memory: acc * x_scale * w_scale (+ bias)."""
    return torch.ops.lmserve_cpu.dequantize_(acc, x_scale, w_scale, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of float32 [rows, hidden] rows, in HF's order of operations."""
    return torch.ops.lmserve_cpu.rms_norm(x, weight, eps)


def add_rms_norm_(
    residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x (in place), then RMSNorm of residual, in one pass."""
    return torch.ops.lmserve_cpu.add_rms_norm_(residual, x, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2n] float32 -> silu(first half) * second half, [rows, n]."""
    return torch.ops.lmserve_cpu.silu_and_mul(gate_up)


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert times their expert's weight: x [rows, K] float32, w [experts, N, K]
    (HF's [out, in]), offsets [experts + 1] int64 (expert e's rows are offsets[e]..[e + 1])
    -> [rows, N]. A row's result is the same whatever rows share its expert."""
    return torch.ops.lmserve_cpu.grouped_matmul(x, w, offsets)


def grouped_matmul_int8(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    offsets: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """`grouped_matmul` in W8A8: int8 rows x_q [rows, K] with scales [rows], int8 w [experts,
    N, K] with scales [experts, N], optional bias [experts, N] -> float32 [rows, N], each product
    dequantized as `dequantize_` does (the int32 sums are exact, so equal to `torch._int_mm`'s)."""
    return torch.ops.lmserve_cpu.grouped_matmul_int8(x_q, x_scale, w, w_scale, offsets, bias)


# GGUF block types the kernels keep quantized, by ggml id
GGUF_TYPES = {
    2: "Q4_0",
    3: "Q4_1",
    6: "Q5_0",
    7: "Q5_1",
    8: "Q8_0",
    12: "Q4_K",
    13: "Q5_K",
    14: "Q6_K",
}


def gguf_matmul(x: torch.Tensor, w: torch.Tensor, qtype: int, out: torch.Tensor, col: int) -> None:
    """float32 x [rows, K] times a GGUF-quantized weight w [N, row bytes] (each row's raw
    blocks, uint8: 32 weights a block, 256 for the K-quants) into out[:, col : col + N] (out:
    contiguous float32 [rows, >= col + N]), the blocks dequantized in registers as gguf-py's
    dequantize does."""
    torch.ops.lmserve_cpu.gguf_matmul(x, w, qtype, out, col)


def gguf_matmul_q8(
    x: torch.Tensor, w: torch.Tensor, qtype: int, out: torch.Tensor, col: int
) -> None:
    """`gguf_matmul` as llama.cpp computes it: x quantized per 32-value block to int8 (its
    Q8_0 / Q8_1), integer dot products with the weights' blocks, scaled in float32."""
    torch.ops.lmserve_cpu.gguf_matmul_q8(x, w, qtype, out, col)


def decode_layers(
    x: torch.Tensor,
    ropes: list[torch.Tensor],
    rope_of: list[int],
    norms: list[torch.Tensor],
    weights: list[torch.Tensor],
    plan: list[int],
    kv_caches: list[torch.Tensor],
    windows: list[int],
    decode: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    shape: tuple[int, int, int],
    scales: tuple[float, float, float],
    flags: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's layers in one call (`models/decode_layers.py` says what the lists hold):
    (last MLP output, residual stream). `decode`: (block_table, seq_lens, token_index,
    slot_mapping); `shape`: (num_heads, num_kv_heads, head_dim); `scales`: (attention scale,
    soft cap or 0, norm eps); `flags`: (Gemma layers, q/k norms, q8 activations). x becomes the
    residual stream, in place."""
    return torch.ops.lmserve_cpu.decode_layers(
        x,
        ropes,
        rope_of,
        norms,
        weights,
        plan,
        kv_caches,
        windows,
        *decode,
        *shape,
        *scales,
        *flags,
    )


def gguf_dequantize(w: torch.Tensor, qtype: int, k: int) -> torch.Tensor:
    """GGUF-quantized rows w [N, row bytes] (uint8) -> float32 [N, K]."""
    return torch.ops.lmserve_cpu.gguf_dequantize(w, qtype, k)


def rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """Rotate x [tokens, heads, head_dim] in place (layers/rotary.py's rotate-half tables)."""
    torch.ops.lmserve_cpu.rotary_(x, cos, signed_sin)


def _first_error(exc: Exception) -> str:
    """The compiler's first error line from a failed build's output, else the last line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or [type(exc).__name__])[0 if errors else -1]
