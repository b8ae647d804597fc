"""Paged attention in Triton: store K/V through the slot mapping, then attend through block tables.

One attention kernel serves every row of a step: decode rows (one query), prefill chunks with or
without cached context (prefix caching, chunked prefill). A program owns a tile of up to BLOCK_Q
consecutive query tokens of one request times all query heads that share one KV head (GQA), so a
decode row still fills a tile with its heads. It walks that request's keys in BLOCK_N tiles,
gathering each key through the block table, with an online (flash-attention) softmax in fp32.

Split-KV ("flash-decoding"): when `num_splits > 1`, each decode row's keys are cut into
`num_splits` ranges attended by separate programs, which write partial (max, sum, acc); a reduce
kernel merges them. Rows with more than one query ignore the split and write their output
directly, so mixed batches need no second launch path.

Launches depend only on tensor shapes (num_tokens, num_reqs, block table width) and a few ints,
never on per-request host values, so a decode step can be captured in a CUDA graph.

Layouts: q / out [num_tokens, num_heads, head_dim]; k / v [num_tokens, num_kv_heads, head_dim];
kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim] (0: keys, 1: values); the last dim
of each must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_LOG2E_JIT = tl.constexpr(_LOG2E)
# Running max starts finite so a row that sees no key in a tile never computes -inf - (-inf).
# NOTE: a global read inside a kernel must be tl.constexpr: compiled Triton rejects plain ones
# (the interpreter does not; test_kernels_compile_for_h100 catches it).
_NEG_BIG = tl.constexpr(-1.0e30)
_TARGET_BLOCK_M = 64  # query rows (tokens x heads of a group) per prefill tile
_MAX_SPLITS = 64


# ---- KV store ---------------------------------------------------------------------------------
@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch padded to its captured size)
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    key = tl.load(k_ptr + token * stride_kt + head * stride_kh + offs_d, mask=d_mask)
    value = tl.load(v_ptr + token * stride_vt + head * stride_vh + offs_d, mask=d_mask)
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + head * stride_ch
    tl.store(key_cache_ptr + dst + offs_d, key, mask=d_mask)
    tl.store(value_cache_ptr + dst + offs_d, value, mask=d_mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write k/v [num_tokens, num_kv_heads, head_dim] into kv_cache at slot_mapping [num_tokens]
    (slot = block_id * block_size + offset). Mutates kv_cache; negative slots are skipped."""
    num_tokens, num_kv_heads, head_dim = k.shape
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    _check_last_dim_contiguous(k, v, key_cache)
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens, num_kv_heads)](
        k,
        v,
        key_cache,
        value_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_D=_block_d(head_dim),
    )


# ---- attention --------------------------------------------------------------------------------
@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q: tl.constexpr):
    """Binary search for the request owning tile q_block.

    Request r owns tiles [first(r), first(r + 1)) with first(r) = (query_start_loc[r] +
    r * (BLOCK_Q - 1)) // BLOCK_Q: at least ceil(query_len / BLOCK_Q) tiles each, exactly one
    per token when BLOCK_Q == 1. Returns the last r with first(r) <= q_block.
    """
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(query_start_loc_ptr + mid) + mid * (BLOCK_Q - 1)) // BLOCK_Q
        right = first <= q_block
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    return lo - 1


@triton.jit(do_not_specialize=["num_reqs", "num_splits", "window"])
def _paged_attention_kernel(
    out_ptr,
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    part_max_ptr,  # [num_reqs, num_heads, num_splits] fp32, log2 domain
    part_sum_ptr,  # [num_reqs, num_heads, num_splits] fp32
    part_acc_ptr,  # [num_reqs, num_heads, num_splits, head_dim] fp32, unnormalized
    sinks_ptr,  # [num_heads] fp32 when HAS_SINKS
    scale_log2,
    window,  # > 0: each query sees its last `window` keys, itself included
    num_reqs,
    num_splits,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_pr,
    stride_ph,
    stride_ar,
    stride_ah,
    stride_as,
    head_dim,
    NUM_QUERIES_PER_KV: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # next power of two >= NUM_QUERIES_PER_KV
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,  # >= BLOCK_Q * HEADS_PAD, >= 16 for tl.dot
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOFT_CAP: tl.constexpr,  # > 0: scores s become SOFT_CAP * tanh(s / SOFT_CAP)
    HAS_SINKS: tl.constexpr,  # one more logit per head in the denominator, with no value
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    req = _find_request(query_start_loc_ptr, num_reqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    q_first = (q_block - (q_start + req * (BLOCK_Q - 1)) // BLOCK_Q) * BLOCK_Q
    if q_first >= q_len:  # spare tile of this request, or past the batch's last token
        return
    use_split = (num_splits > 1) & (q_len == 1)
    if split >= tl.where(use_split, num_splits, 1):
        return
    context_len = seq_len - q_len

    # Row m of the tile: query token q_first + m // HEADS_PAD, head m % HEADS_PAD of the group.
    offs_m = tl.arange(0, BLOCK_M)
    q_local = q_first + offs_m // HEADS_PAD
    head_in_group = offs_m % HEADS_PAD
    head = kv_head * NUM_QUERIES_PER_KV + head_in_group
    row_valid = (
        (offs_m // HEADS_PAD < BLOCK_Q) & (q_local < q_len) & (head_in_group < NUM_QUERIES_PER_KV)
    )
    q_pos = context_len + q_local  # [BLOCK_M] position in the sequence: sees keys <= it
    token = (q_start + q_local).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    io_mask = row_valid[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]

    # Keys this tile can see: causal bound of its last query, cut to this split's range.
    kv_end = context_len + tl.minimum(q_first + BLOCK_Q, q_len)
    per_split = tl.where(
        use_split, tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, kv_end
    )
    kv_start = split * per_split
    kv_end = tl.minimum(kv_end, kv_start + per_split)
    if window > 0:  # nothing before the window of the tile's first query
        kv_start = tl.maximum(kv_start, context_len + q_first - window + 1)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS and split == 0:  # the sink starts the softmax: a key of zero value, once a row
        m_i = tl.load(sinks_ptr + head, mask=row_valid, other=0.0).to(tl.float32) * _LOG2E_JIT
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_table_ptr + req.to(tl.int64) * stride_bt
    for start_n in range(kv_start, kv_end, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k_valid = k_pos < kv_end
        block_id = tl.load(table_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        kv_off = block_id * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        key_t = tl.load(
            key_cache_ptr + kv_off[None, :] + offs_d[:, None],
            mask=d_mask[:, None] & k_valid[None, :],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        value = tl.load(
            value_cache_ptr + kv_off[:, None] + offs_d[None, :],
            mask=k_valid[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        scores = tl.dot(q, key_t, input_precision=DOT_PRECISION) * scale_log2
        if SOFT_CAP > 0:  # cap * tanh(s / cap) in the log2 domain; tanh(x) = 1 - 2 / (e^2x + 1)
            tanh = 1.0 - 2.0 / (tl.exp2(2.0 * scores / SOFT_CAP) + 1.0)
            scores = (SOFT_CAP * _LOG2E_JIT) * tanh
        visible = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
        if window > 0:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(value.dtype), value, input_precision=DOT_PRECISION)
        m_i = m_new

    if use_split:
        part = req.to(tl.int64) * stride_pr + head * stride_ph + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        acc_off = req.to(tl.int64) * stride_ar + head * stride_ah + split * stride_as
        tl.store(part_acc_ptr + acc_off[:, None] + offs_d[None, :], acc, mask=io_mask)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=io_mask,
        )


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    out_ptr,
    query_start_loc_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    stride_pr,
    stride_ph,
    stride_ar,
    stride_ah,
    stride_as,
    head_dim,
    SPLITS_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge one decode row's split partials for one head: out = sum_s w_s acc_s / sum_s w_s l_s
    with w_s = 2^(m_s - max m)."""
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + req)
    if tl.load(query_start_loc_ptr + req + 1) - q_start != 1:  # not split: written directly
        return
    offs_s = tl.arange(0, SPLITS_PAD)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    part = req * stride_pr + head * stride_ph + offs_s
    m = tl.load(part_max_ptr + part, mask=s_mask, other=float("-inf"))
    weight = tl.exp2(m - tl.max(m, 0))  # [SPLITS_PAD]; empty splits have l = 0, acc = 0
    total = tl.sum(tl.load(part_sum_ptr + part, mask=s_mask, other=0.0) * weight, 0)
    acc = tl.load(
        part_acc_ptr
        + req * stride_ar
        + head * stride_ah
        + offs_s[:, None] * stride_as
        + offs_d[None, :],
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [SPLITS_PAD, BLOCK_D]
    out = tl.sum(acc * weight[:, None], 0) / total
    tl.store(
        out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=d_mask,
    )


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    window: int | None = None,
    soft_cap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q over the paged cache; returns out [num_tokens, num_heads, head_dim].

    query_start_loc [num_reqs + 1] and seq_lens [num_reqs] are int32 device tensors; row i's
    queries are the last query_len_i positions of its seq_lens[i] keys (already stored).
    block_table [num_reqs, max_blocks] int32 must cover ceil(seq_len / block_size) blocks per row.
    max_query_len only picks the tile shape (1: one query token per tile, the decode shape); any
    value gives correct results. num_splits > 1 splits the keys of every decode row (query_len 1)
    into that many ranges. Tokens past query_start_loc[-1] are left untouched in out (padding).
    window, soft_cap and sinks as AttentionBackend.forward's.
    """
    num_tokens, num_heads, head_dim = q.shape
    key_cache, value_cache = kv_cache[0], kv_cache[1]
    num_kv_heads = key_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    _check_last_dim_contiguous(q, key_cache)
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_reqs == 0:
        return out
    queries_per_kv = num_heads // num_kv_heads
    heads_pad = triton.next_power_of_2(queries_per_kv)
    if max_query_len <= 1:
        block_q = 1
    else:
        block_q = max(1, min(triton.next_power_of_2(max_query_len), _TARGET_BLOCK_M // heads_pad))
    block_m = max(16, block_q * heads_pad)
    block_d = _block_d(head_dim)
    num_q_blocks = (num_tokens + num_reqs * (block_q - 1)) // block_q  # see _find_request

    if num_splits > 1:
        part_max = q.new_empty((num_reqs, num_heads, num_splits), dtype=torch.float32)
        part_sum = torch.empty_like(part_max)
        part_acc = q.new_empty((num_reqs, num_heads, num_splits, head_dim), dtype=torch.float32)
    else:  # never written; the kernel still needs pointers of the right type
        part_max = part_sum = part_acc = q.new_empty((1, 1, 1, 1), dtype=torch.float32)
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_splits)](
        out,
        q,
        key_cache,
        value_cache,
        block_table,
        query_start_loc,
        seq_lens,
        part_max,
        part_sum,
        part_acc,
        part_max if sinks is None else sinks.float().contiguous(),
        scale * _LOG2E,
        window or 0,
        num_reqs,
        num_splits,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_table.stride(0),
        part_max.stride(0),
        part_max.stride(1),
        part_acc.stride(0),
        part_acc.stride(1),
        part_acc.stride(2),
        head_dim,
        NUM_QUERIES_PER_KV=queries_per_kv,
        HEADS_PAD=heads_pad,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d,
        BLOCK_SIZE=key_cache.shape[1],
        # fp32 must not silently drop to tf32 on tensor cores; half types ignore this.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFT_CAP=float(soft_cap or 0.0),
        HAS_SINKS=sinks is not None,
    )
    if num_splits > 1:
        _reduce_splits_kernel[(num_reqs, num_heads)](
            out,
            query_start_loc,
            part_max,
            part_sum,
            part_acc,
            num_splits,
            out.stride(0),
            out.stride(1),
            part_max.stride(0),
            part_max.stride(1),
            part_acc.stride(0),
            part_acc.stride(1),
            part_acc.stride(2),
            head_dim,
            SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=block_d,
        )
    return out


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_last_dim_contiguous(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"last dim must be contiguous, got strides {t.stride()}")


__all__ = ["paged_attention", "store_kv"]
