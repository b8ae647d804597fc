"""Fused kernels in Triton for the CUDA path: RMSNorm (with the residual add before it),
SiLU-and-mul, rotary embedding in place, and the grouped expert GEMM of mixture-of-experts
layers.

In plain torch each of these is several kernels (RMSNorm alone ~6), and at small batches a
decode step's time on a GPU is mostly such tiny kernels: ~25 per layer, ~2 us each, against
~6 ms of weight reads for an 8B model, about a quarter on top. One program per token row here.
Rounding follows HF's modules, so bf16 results stay within an ulp of the torch forms: the
residual sum is rounded to the activation dtype before it is normalized in fp32, the
normalized value is rounded before the weight multiplies it, and SiLU is rounded before the
up projection multiplies it.

Loaded only through `cuda_ops`, so `import lmserve` never imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded as torch's add rounds
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / n_cols
    normed = (x32 * tl.math.rsqrt(variance + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of the rows of x [rows, n] (last dim contiguous); with `residual` [rows, n], adds
    x into it in place first and normalizes the sum (vLLM's fused_add_rms_norm)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    if rows == 0:
        return out
    _rms_norm_kernel[(rows,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        out.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(n),
    )
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(gate.dtype), mask=mask)


_SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2n] (last dim contiguous) -> silu(gate) * up, [rows, n]."""
    rows, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty((rows, n))
    if rows == 0:
        return out
    grid = (rows, triton.cdiv(n, _SILU_BLOCK))
    _silu_and_mul_kernel[grid](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=_SILU_BLOCK)
    return out


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    stride_token,
    stride_head,
    stride_cos,
    num_heads,
    half,
    HEADS_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    """One token: every head of it, out = x * cos + roll(x, half) * signed_sin."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    dim_mask = dims < half
    mask = (heads < num_heads) & dim_mask
    base = x_ptr + token * stride_token + heads * stride_head
    table = token * stride_cos + dims
    x1 = tl.load(base + dims, mask=mask, other=0.0)
    x2 = tl.load(base + half + dims, mask=mask, other=0.0)
    cos1 = tl.load(cos_ptr + table, mask=dim_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + half + table, mask=dim_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + table, mask=dim_mask, other=0.0).to(tl.float32)  # -sin
    sin2 = tl.load(sin_ptr + half + table, mask=dim_mask, other=0.0).to(tl.float32)  # +sin
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(base + dims, (a * cos1 + b * sin1).to(x1.dtype), mask=mask)
    tl.store(base + half + dims, (b * cos2 + a * sin2).to(x1.dtype), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, head_dim] in place (a strided view of q/k is fine: the last dim
    contiguous); cos and signed_sin [tokens, 1, head_dim] from RotaryEmbedding."""
    tokens, heads, head_dim = x.shape
    if tokens == 0:
        return x
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    _rotary_kernel[(tokens,)](
        x,
        cos,
        signed_sin,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        heads,
        head_dim // 2,
        HEADS_PAD=triton.next_power_of_2(heads),
        HALF_PAD=triton.next_power_of_2(head_dim // 2),
    )
    return x


@triton.jit
def _grouped_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    offsets_ptr,
    block_expert_ptr,
    block_start_ptr,
    n_size,
    k_size,
    num_experts,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One block of up to BLOCK_M rows of one expert times BLOCK_N of its output columns."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < num_experts:
        row_end = tl.load(offsets_ptr + expert + 1)
        rows = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask, col_mask = rows < row_end, cols < n_size
        w_base = w_ptr + expert.to(tl.int64) * n_size * k_size
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_size, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < k_size
            a = tl.load(
                x_ptr + rows[:, None].to(tl.int64) * k_size + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(  # w[expert] is [N, K]: read a [BLOCK_K, BLOCK_N] tile of its transpose
                w_base + cols[None, :].to(tl.int64) * k_size + ks[:, None],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            if IEEE:  # float32 as torch multiplies it on CUDA by default: no TF32
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        out = out_ptr + rows[:, None].to(tl.int64) * n_size + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


_MOE_BLOCK_M, _MOE_BLOCK_N, _MOE_BLOCK_K = 16, 64, 32


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows sorted by expert times their expert's weight (the CPU kernel's contract): x [rows, K],
    w [experts, N, K], offsets [experts + 1] -> [rows, N] in x's dtype, accumulated in fp32.
    Each expert's rows are cut into blocks of 16 on the device, with no host sync (CUDA graphs
    capture it): the grid holds every block the rows could need, cdiv(rows, 16) + experts, and
    the blocks no expert has return at once."""
    rows, k_size = x.shape
    num_experts, n_size = w.shape[0], w.shape[1]
    out = x.new_empty((rows, n_size))
    if rows == 0:
        return out
    counts = offsets[1:] - offsets[:-1]
    blocks = (counts + _MOE_BLOCK_M - 1) // _MOE_BLOCK_M
    block_ends = blocks.cumsum(0)
    max_blocks = triton.cdiv(rows, _MOE_BLOCK_M) + num_experts
    ids = torch.arange(max_blocks, device=x.device)
    block_expert = torch.searchsorted(block_ends, ids, right=True)  # num_experts: unused block
    expert = block_expert.clamp(max=num_experts - 1)
    first_block = block_ends.index_select(0, expert) - blocks.index_select(0, expert)
    block_start = offsets.index_select(0, expert) + (ids - first_block) * _MOE_BLOCK_M
    grid = (max_blocks, triton.cdiv(n_size, _MOE_BLOCK_N))
    _grouped_matmul_kernel[grid](
        x.contiguous(),
        w.contiguous(),
        out,
        offsets,
        block_expert.to(torch.int32),
        block_start.to(torch.int32),
        n_size,
        k_size,
        num_experts,
        BLOCK_M=_MOE_BLOCK_M,
        BLOCK_N=_MOE_BLOCK_N,
        BLOCK_K=_MOE_BLOCK_K,
        IEEE=x.dtype == torch.float32,
    )
    return out
