// CPU kernels for the hot path, built at first use by lmserve/kernels/cpu_ops.py.
//
// Each replaces a chain of small torch ops whose per-op overhead and extra passes over memory
// dominated a decode step on a 2-core CPU (SmolLM2-135M, batch 64): paged decode attention
// (a gather + SDPA, or ~15 batched-matmul and merge ops), K/V stores (two index_put), int8
// dynamic quantization around `torch._int_mm` (~10 elementwise ops per linear layer), and the
// residual add + RMSNorm, SiLU-and-multiply and rotary chains (3-5 ops each), and the
// mixture-of-experts projections (one small GEMM per expert).
// SIMD through ATen's Vectorized<float>, threads through at::parallel_for (torch's own pool).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Limits of the register tiles below; cpu_ops.py checks them before calling.
constexpr int64_t kMaxGroup = 16;    // query heads per KV head
constexpr int64_t kMaxVectors = 32;  // head_dim / kLanes
constexpr int64_t kFloatsPerLine = 64 / sizeof(float);

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// One request's decode query heads that share KV head `h`, against its keys from `first_key`
// on (0, or where a sliding window starts): an online softmax over the blocks, so each K/V byte
// is read once. Scores are capped by soft_cap * tanh(s / soft_cap) when soft_cap > 0.
// NV = head_dim / kLanes when known at compile time (the common sizes), else 0 and `nv` at run
// time.
template <int64_t NV>
void attend_decode_row(const float* q, int64_t q_head_stride, const float* key_cache,
                       const float* value_cache, const int32_t* blocks, int64_t seq_len,
                       int64_t first_key, int64_t kv_heads, int64_t h, int64_t block_size,
                       int64_t group, int64_t nv_runtime, float scale, float soft_cap,
                       const float* sinks, float* scores, float* out, int64_t out_head_stride) {
  const int64_t nv = NV > 0 ? NV : nv_runtime;
  const int64_t head_dim = nv * kLanes;
  Vec qv[kMaxGroup][NV > 0 ? NV : kMaxVectors];
  Vec acc[kMaxGroup][NV > 0 ? NV : kMaxVectors];
  float row_max[kMaxGroup];
  float row_sum[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t v = 0; v < nv; ++v) {
      qv[g][v] = Vec::loadu(q + g * q_head_stride + v * kLanes) * Vec(scale);
      acc[g][v] = Vec(0.f);
    }
    // a sink is a key with its own logit and a zero value: the softmax's starting state
    row_max[g] = sinks ? sinks[g] : -std::numeric_limits<float>::infinity();
    row_sum[g] = sinks ? 1.f : 0.f;
  }
  const int64_t block_elems = block_size * head_dim;
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  for (int64_t b = first_key / block_size; b < num_blocks; ++b) {
    const int64_t base = (static_cast<int64_t>(blocks[b]) * kv_heads + h) * block_elems;
    const float* keys = key_cache + base;
    const float* values = value_cache + base;
    const int64_t n = std::min(block_size, seq_len - b * block_size);
    const int64_t j0 = std::max<int64_t>(0, first_key - b * block_size);  // first key in window
    // The next block's K and V, a few cache lines per key: blocks are scattered, so the
    // hardware prefetcher cannot guess them (-17% kernel time at batch 64, context 192).
    const int64_t next =
        b + 1 < num_blocks ? (static_cast<int64_t>(blocks[b + 1]) * kv_heads + h) * block_elems
                           : base;
    for (int64_t j = j0; j < n; ++j) {
      for (int64_t line = j * head_dim; line < (j + 1) * head_dim; line += kFloatsPerLine) {
        __builtin_prefetch(key_cache + next + line);
        __builtin_prefetch(value_cache + next + line);
      }
      Vec k[NV > 0 ? NV : kMaxVectors];
      for (int64_t v = 0; v < nv; ++v) k[v] = Vec::loadu(keys + j * head_dim + v * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        Vec dot = qv[g][0] * k[0];
        for (int64_t v = 1; v < nv; ++v) dot = at::vec::fmadd(qv[g][v], k[v], dot);
        const float score = hsum(dot);
        scores[g * block_size + j] =
            soft_cap > 0.f ? soft_cap * std::tanh(score / soft_cap) : score;
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * block_size;
      float new_max = row_max[g];
      for (int64_t j = j0; j < n; ++j) new_max = std::max(new_max, s[j]);
      const float correction = std::exp(row_max[g] - new_max);
      row_max[g] = new_max;
      float sum = 0.f;
      int64_t j = j0;
      for (; j + kLanes <= n; j += kLanes) {
        const Vec p = (Vec::loadu(s + j) - Vec(new_max)).exp_u20();
        p.store(s + j);
        sum += hsum(p);
      }
      for (; j < n; ++j) {
        s[j] = std::exp(s[j] - new_max);
        sum += s[j];
      }
      row_sum[g] = row_sum[g] * correction + sum;
      for (int64_t v = 0; v < nv; ++v) acc[g][v] = acc[g][v] * Vec(correction);
    }
    for (int64_t j = j0; j < n; ++j) {
      Vec val[NV > 0 ? NV : kMaxVectors];
      for (int64_t v = 0; v < nv; ++v) val[v] = Vec::loadu(values + j * head_dim + v * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        const Vec p(scores[g * block_size + j]);
        for (int64_t v = 0; v < nv; ++v) acc[g][v] = at::vec::fmadd(p, val[v], acc[g][v]);
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const Vec inv(1.f / row_sum[g]);
    for (int64_t v = 0; v < nv; ++v) {
      (acc[g][v] * inv).store(out + g * out_head_stride + v * kLanes);
    }
  }
}

// q, out: [num_tokens, num_heads, head_dim] (head_dim contiguous); caches: [num_blocks,
// kv_heads, block_size, head_dim] contiguous; block_table [rows, max_blocks] int32; seq_lens
// [rows] int32; token_index [rows] int64: the query token of each decode row, whose output
// row of `out` is written. window > 0: each row sees its last `window` keys only; soft_cap > 0:
// scores capped by soft_cap * tanh(s / soft_cap); sinks (optional, [heads] float32): one more
// logit per head in the softmax's denominator, with no value.
void decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_table,
                      const at::Tensor& seq_lens, const at::Tensor& token_index, at::Tensor& out,
                      double scale, int64_t window, double soft_cap,
                      const std::optional<at::Tensor>& sinks) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && key_cache.scalar_type() == at::kFloat &&
                  value_cache.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "decode_attention: float32 only");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  block_table.is_contiguous() && seq_lens.is_contiguous() &&
                  token_index.is_contiguous(),
              "decode_attention: caches and index tensors must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                  token_index.scalar_type() == at::kLong,
              "decode_attention: int32 block_table and seq_lens, int64 token_index");
  const int64_t rows = token_index.size(0);
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = key_cache.size(1), block_size = key_cache.size(2);
  const int64_t group = heads / kv_heads;
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "decode_attention: head_dim strided");
  TORCH_CHECK(key_cache.size(3) == head_dim && head_dim % kLanes == 0 &&
                  head_dim / kLanes <= kMaxVectors && group <= kMaxGroup,
              "decode_attention: unsupported head_dim or group size");
  const int64_t nv = head_dim / kLanes;
  const int64_t max_blocks = block_table.size(1);
  const float* q_ptr = q.data_ptr<float>();
  const float* k_ptr = key_cache.data_ptr<float>();
  const float* v_ptr = value_cache.data_ptr<float>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t* tokens = token_index.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const float fcap = static_cast<float>(soft_cap);
  TORCH_CHECK(!sinks || (sinks->scalar_type() == at::kFloat && sinks->is_contiguous() &&
                         sinks->numel() == heads),
              "decode_attention: sinks must be float32 [num_heads], contiguous");
  const float* sinks_ptr = sinks ? sinks->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads;
      const float* qh = q_ptr + tokens[r] * q.stride(0) + h * group * q.stride(1);
      float* oh = out_ptr + tokens[r] * out.stride(0) + h * group * out.stride(1);
      const int32_t* blocks = table + r * max_blocks;
      const int64_t first = window > 0 ? std::max<int64_t>(0, lens[r] - window) : 0;
      const float* sink = sinks_ptr ? sinks_ptr + h * group : nullptr;
      switch (nv) {
#define LMSERVE_ATTEND(N)                                                                     \
  case N:                                                                                     \
    attend_decode_row<N>(qh, q.stride(1), k_ptr, v_ptr, blocks, lens[r], first, kv_heads, h,  \
                         block_size, group, nv, fscale, fcap, sink, scores.data(), oh,        \
                         out.stride(1));                                                      \
    break;
        LMSERVE_ATTEND(4)
        LMSERVE_ATTEND(8)
        LMSERVE_ATTEND(16)
#undef LMSERVE_ATTEND
        default:
          attend_decode_row<0>(qh, q.stride(1), k_ptr, v_ptr, blocks, lens[r], first, kv_heads,
                               h, block_size, group, nv, fscale, fcap, sink, scores.data(),
                               oh, out.stride(1));
      }
    }
  });
}

// k, v: [num_tokens, kv_heads, head_dim] (head_dim contiguous) stored at slot_mapping's slots
// of caches [num_blocks, kv_heads, block_size, head_dim]; a negative slot stores nothing.
void store_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& key_cache,
              at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.scalar_type() == key_cache.scalar_type() &&
                  v.scalar_type() == value_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              "store_kv: k, v and the caches must share a dtype");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  slot_mapping.is_contiguous() && slot_mapping.scalar_type() == at::kLong,
              "store_kv: contiguous caches and an int64 slot mapping");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "store_kv: head_dim strided");
  const int64_t tokens = k.size(0), kv_heads = k.size(1), head_dim = k.size(2);
  const int64_t block_size = key_cache.size(2);
  const int64_t row_bytes = head_dim * k.element_size();
  const auto* k_ptr = static_cast<const char*>(k.data_ptr());
  const auto* v_ptr = static_cast<const char*>(v.data_ptr());
  auto* kc = static_cast<char*>(key_cache.data_ptr());
  auto* vc = static_cast<char*>(value_cache.data_ptr());
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t es = k.element_size();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t block = slot / block_size, offset = slot % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t dst = ((block * kv_heads + h) * block_size + offset) * row_bytes;
      std::memcpy(kc + dst, k_ptr + (t * k.stride(0) + h * k.stride(1)) * es, row_bytes);
      std::memcpy(vc + dst, v_ptr + (t * v.stride(0) + h * v.stride(1)) * es, row_bytes);
    }
  }
}

// Symmetric per-row int8: scale = max|x| / 127 (at least 1e-12 / 127), q = round(x / scale)
// rounding half to even: the same values as the torch expression in layers/int8_linear.py.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1,
              "quantize_rows: float32 [rows, cols] with contiguous rows");
  const int64_t rows = x.size(0), cols = x.size(1);
  at::Tensor q = at::empty({rows, cols}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({rows, 1}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  int8_t* q_ptr = q.data_ptr<int8_t>();
  float* s_ptr = scales.data_ptr<float>();
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = x_ptr + r * x_stride;
      const float max_abs = at::vec::map_reduce_all<float>(
          [](const Vec& a) { return a.abs(); },
          [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, row, cols);
      const float scale = std::max(max_abs, 1e-12f) / 127.f;
      s_ptr[r] = scale;
      int8_t* out = q_ptr + r * cols;
      const Vec vscale(scale);
      int64_t c = 0;
      alignas(64) int32_t rounded[kLanes];
      for (; c + kLanes <= cols; c += kLanes) {
        const Vec q = (Vec::loadu(row + c) / vscale).round();  // exact integers in [-127, 127]
        at::vec::convert_to_int_of_same_size(q).store(rounded);
        for (int64_t i = 0; i < kLanes; ++i) out[c + i] = static_cast<int8_t>(rounded[i]);
      }
      for (; c < cols; ++c) out[c] = static_cast<int8_t>(std::nearbyint(row[c] / scale));
    }
  });
  return {q, scales};
}

// The int32 product of quantize_rows' rows and int8 weights -> float, in place:
// acc * x_scale[row] * w_scale[col] (+ bias[col]), in that order (as the torch expression).
at::Tensor dequantize_(at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.scalar_type() == at::kInt && acc.is_contiguous() && acc.dim() == 2,
              "dequantize_: contiguous int32 [rows, cols]");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  TORCH_CHECK(x_scale.is_contiguous() && x_scale.numel() == rows &&
                  w_scale.is_contiguous() && w_scale.numel() == cols,
              "dequantize_: one x_scale per row and one w_scale per column");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->is_contiguous() && bias->numel() == cols),
              "dequantize_: one bias per column");
  at::Tensor out = acc.view(at::kFloat);  // same bytes, read as int32 and written as float
  const int32_t* in_ptr = acc.data_ptr<int32_t>();
  float* out_ptr = out.data_ptr<float>();
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const float* b = has_bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* in = in_ptr + r * cols;
      float* o = out_ptr + r * cols;
      const Vec row_scale(xs[r]);
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        const Vec converted = at::vec::convert_to_fp_of_same_size<float>(
            at::vec::Vectorized<int32_t>::loadu(in + c));
        Vec y = converted * row_scale * Vec::loadu(ws + c);
        if (b != nullptr) y = y + Vec::loadu(b + c);
        y.store(o + c);
      }
      for (; c < cols; ++c) {
        float y = static_cast<float>(in[c]) * xs[r] * ws[c];
        if (b != nullptr) y += b[c];
        o[c] = y;
      }
    }
  });
  return out;
}

// Per row of [rows, hidden]: y = weight * (x * rsqrt(mean(x^2) + eps)), HF's order of ops.
// With `residual`, first residual += x and normalize that (the pre-norm residual stream).
void rms_norm_rows(const float* x, int64_t x_stride, float* residual, const float* weight,
                   float* out, int64_t rows, int64_t hidden, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = x + r * x_stride;
      float* o = out + r * hidden;
      const float* src = in;
      if (residual != nullptr) {
        float* res = residual + r * hidden;
        at::vec::map2<float>([](Vec a, Vec b) { return a + b; }, res, res, in, hidden);
        src = res;
      }
      const float sum_sq = at::vec::map_reduce_all<float>(
          [](const Vec& a) { return a * a; },
          [](const Vec& a, const Vec& b) { return a + b; }, src, hidden);
      const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
      at::vec::map2<float>([inv](Vec a, Vec w) { return w * (a * Vec(inv)); }, o, src, weight,
                           hidden);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 &&
                  weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: float32 [rows, hidden] with contiguous rows");
  at::Tensor out = at::empty(x.sizes(), x.options());
  rms_norm_rows(x.data_ptr<float>(), x.stride(0), nullptr, weight.data_ptr<float>(),
                out.data_ptr<float>(), x.size(0), x.size(1), static_cast<float>(eps));
  return out;
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1 &&
                  residual.is_contiguous() && residual.sizes() == x.sizes() &&
                  residual.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "add_rms_norm_: float32 [rows, hidden] x and contiguous residual");
  at::Tensor out = at::empty(x.sizes(), x.options());
  rms_norm_rows(x.data_ptr<float>(), x.stride(0), residual.data_ptr<float>(),
                weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                static_cast<float>(eps));
  return out;
}

// [rows, 2 * n] -> [rows, n]: silu(gate) * up, silu as torch's vectorized CPU kernel writes it.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.scalar_type() == at::kFloat &&
                  gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "silu_and_mul: contiguous float32 [rows, 2 * n]");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, n}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      at::vec::map2<float>(
          [](Vec gate, Vec up) { return gate / (Vec(1.f) + gate.neg().exp()) * up; }, o + r * n,
          in + r * 2 * n, in + r * 2 * n + n, n);
    }
  });
  return out;
}

// x [tokens, heads, head_dim] (head_dim contiguous) rotated in place, rotate-half layout:
// x * cos + roll(x, head_dim / 2) * signed_sin, with cos / signed_sin [tokens, 1, head_dim]
// as layers/rotary.py builds them; the same two products and sum, so the same values.
void rotary_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1 &&
                  cos.is_contiguous() && signed_sin.is_contiguous() &&
                  cos.numel() == x.size(0) * x.size(2) && x.size(2) % 2 == 0,
              "rotary_: float32 [tokens, heads, head_dim] with contiguous cos / sin rows");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  float* base = x.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = signed_sin.data_ptr<float>();
  const int64_t t_stride = x.stride(0), h_stride = x.stride(1);
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = c + t * dim;
      const float* st = s + t * dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* v = base + t * t_stride + h * h_stride;
        int64_t i = 0;
        for (; i + kLanes <= half; i += kLanes) {
          const Vec lo = Vec::loadu(v + i), hi = Vec::loadu(v + half + i);
          (lo * Vec::loadu(ct + i) + hi * Vec::loadu(st + i)).store(v + i);
          (hi * Vec::loadu(ct + half + i) + lo * Vec::loadu(st + half + i)).store(v + half + i);
        }
        for (; i < half; ++i) {
          const float lo = v[i], hi = v[half + i];
          v[i] = lo * ct[i] + hi * st[i];
          v[half + i] = hi * ct[half + i] + lo * st[half + i];
        }
      }
    }
  });
}


// Rows r of x times the columns n0..n0+C of one expert's weight w [N, K] (HF's [out, in]):
// out[r, n] = dot(x[r], w[n]), each a lane-wise sum over k then a horizontal sum, plus a scalar
// tail. A row's result does not depend on R or on which rows share its block, so an expert's
// rows batched give each row's result alone.
template <int64_t R, int64_t C>
void expert_dots(const float* x, int64_t k_size, const float* w, int64_t n0, float* out,
                 int64_t n_size) {
  Vec acc[R][C];
  float tail[R][C] = {};
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) acc[m][c] = Vec(0.f);
  }
  int64_t k = 0;
  for (; k + kLanes <= k_size; k += kLanes) {
    Vec xv[R];
    for (int64_t m = 0; m < R; ++m) xv[m] = Vec::loadu(x + m * k_size + k);
    for (int64_t c = 0; c < C; ++c) {
      const Vec wv = Vec::loadu(w + (n0 + c) * k_size + k);
      for (int64_t m = 0; m < R; ++m) acc[m][c] = acc[m][c] + xv[m] * wv;
    }
  }
  for (; k < k_size; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t m = 0; m < R; ++m) tail[m][c] += x[m * k_size + k] * w[(n0 + c) * k_size + k];
    }
  }
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) out[m * n_size + n0 + c] = hsum(acc[m][c]) + tail[m][c];
  }
}

// One expert's rows times columns [n_begin, n_end): four rows and four columns per register
// block (16 accumulators: fits AVX2's registers too), then the leftover rows and columns.
void expert_tile(const float* x, int64_t rows, int64_t k_size, const float* w, int64_t n_begin,
                 int64_t n_end, float* out, int64_t n_size) {
  int64_t n = n_begin;
  for (; n + 4 <= n_end; n += 4) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      expert_dots<4, 4>(x + r * k_size, k_size, w, n, out + r * n_size, n_size);
    }
    for (; r < rows; ++r) expert_dots<1, 4>(x + r * k_size, k_size, w, n, out + r * n_size, n_size);
  }
  for (; n < n_end; ++n) {
    for (int64_t r = 0; r < rows; ++r) {
      expert_dots<1, 1>(x + r * k_size, k_size, w, n, out + r * n_size, n_size);
    }
  }
}

// The work of a grouped product: each (expert, column tile) of the experts that have rows,
// after checking that `offsets` [experts + 1] split the `rows` rows in order.
constexpr int64_t kTileColumns = 64;

struct ExpertTile {
  int64_t expert, n_begin, n_end;
};

struct GroupedWork {
  at::Tensor offsets;  // contiguous int64, read through off()
  std::vector<ExpertTile> tiles;
  const int64_t* off() const { return offsets.data_ptr<int64_t>(); }
};

GroupedWork grouped_work(const at::Tensor& offsets, int64_t experts, int64_t rows, int64_t n_size,
                         const char* name) {
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.size(0) == experts + 1,
              name, ": int64 offsets [experts + 1]");
  GroupedWork work{offsets.contiguous(), {}};
  const int64_t* off = work.off();
  TORCH_CHECK(off[0] == 0 && off[experts] == rows, name, ": offsets span x's rows");
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK(off[e + 1] >= off[e], name, ": offsets must not decrease");
    for (int64_t n = 0; off[e + 1] > off[e] && n < n_size; n += kTileColumns) {
      work.tiles.push_back({e, n, std::min(n + kTileColumns, n_size)});
    }
  }
  return work;
}

// Mixture-of-experts projection over rows sorted by expert: rows offsets[e]..offsets[e + 1] of
// x [rows, K] times expert e's weight w[e] [N, K]. Each weight byte is read once, in order (a few
// rows per expert leave oneDNN's small GEMMs at a third of the memory bandwidth); the work is
// split over (expert, 64 columns) so both threads stream.
at::Tensor grouped_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous() &&
                  x.size(1) == w.size(2),
              "grouped_matmul: contiguous float32 x [rows, K] and w [experts, N, K]");
  const int64_t k_size = x.size(1), n_size = w.size(1);
  const GroupedWork work = grouped_work(offsets, w.size(0), x.size(0), n_size, "grouped_matmul");
  const int64_t* off = work.off();
  at::Tensor out = at::empty({x.size(0), n_size}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t num_tiles = static_cast<int64_t>(work.tiles.size());
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const ExpertTile& tile = work.tiles[i];
      const int64_t e = tile.expert;
      expert_tile(xp + off[e] * k_size, off[e + 1] - off[e], k_size, wp + e * n_size * k_size,
                  tile.n_begin, tile.n_end, op + off[e] * n_size, n_size);
    }
  });
  return out;
}


// int8 rows r of x_q times columns n0..n0+C of one expert's int8 weight w [N, K]: exact int32
// dot products, so any order of summation gives _int_mm's accumulators. The u8 x s8 pair
// products (|x| against w carrying x's sign) cannot saturate: both lie in [-127, 127]. 64 bytes
// of K at a time with AVX-512, then 32 with AVX2, then one.
template <int64_t R, int64_t C>
void expert_int8_dots(const int8_t* x, int64_t k_size, const int8_t* w, int64_t n0,
                      int32_t* acc_out) {
  int32_t acc[R][C] = {};
  int64_t k = 0;
#if defined(CPU_CAPABILITY_AVX512)
  __m512i wacc[R][C];
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) wacc[m][c] = _mm512_setzero_si512();
  }
  [[maybe_unused]] const __m512i wide_ones = _mm512_set1_epi16(1);
  for (; k + 64 <= k_size; k += 64) {
    __m512i ax[R];
    __mmask64 negative[R];
    for (int64_t m = 0; m < R; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * k_size + k);
      ax[m] = _mm512_abs_epi8(xv);
      negative[m] = _mm512_movepi8_mask(xv);
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m512i wv = _mm512_loadu_si512(w + (n0 + c) * k_size + k);
      for (int64_t m = 0; m < R; ++m) {
        const __m512i signed_w =
            _mm512_mask_sub_epi8(wv, negative[m], _mm512_setzero_si512(), wv);
#if defined(__AVX512VNNI__)
        wacc[m][c] = _mm512_dpbusd_epi32(wacc[m][c], ax[m], signed_w);  // the same 4-byte sums
#else
        const __m512i pairs = _mm512_maddubs_epi16(ax[m], signed_w);
        wacc[m][c] = _mm512_add_epi32(wacc[m][c], _mm512_madd_epi16(pairs, wide_ones));
#endif
      }
    }
  }
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) acc[m][c] += _mm512_reduce_add_epi32(wacc[m][c]);
  }
#endif
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  __m256i vacc[R][C];
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) vacc[m][c] = _mm256_setzero_si256();
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (; k + 32 <= k_size; k += 32) {
    __m256i xv[R], ax[R];
    for (int64_t m = 0; m < R; ++m) {
      xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * k_size + k));
      ax[m] = _mm256_abs_epi8(xv[m]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m256i wv =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + c) * k_size + k));
      for (int64_t m = 0; m < R; ++m) {
        const __m256i pairs = _mm256_maddubs_epi16(ax[m], _mm256_sign_epi8(wv, xv[m]));
        vacc[m][c] = _mm256_add_epi32(vacc[m][c], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vacc[m][c]);
      for (int32_t lane : lanes) acc[m][c] += lane;
    }
  }
#endif
  for (; k < k_size; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t m = 0; m < R; ++m) {
        acc[m][c] += static_cast<int32_t>(x[m * k_size + k]) * w[(n0 + c) * k_size + k];
      }
    }
  }
  for (int64_t m = 0; m < R; ++m) {
    for (int64_t c = 0; c < C; ++c) acc_out[m * C + c] = acc[m][c];
  }
}

// grouped_matmul's int8 twin (W8A8, as layers/int8_linear.py): rows of x_q [rows, K] (scales
// x_scale [rows]) times their expert's w [experts, N, K] (scales w_scale [experts, N]), each
// product dequantized as dequantize_ does it: acc * x_scale * w_scale (+ bias [experts, N]).
at::Tensor grouped_matmul_int8(const at::Tensor& x_q, const at::Tensor& x_scale,
                               const at::Tensor& w, const at::Tensor& w_scale,
                               const at::Tensor& offsets, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_q.dim() == 2 && w.dim() == 3 && x_q.scalar_type() == at::kChar &&
                  w.scalar_type() == at::kChar && x_q.is_contiguous() && w.is_contiguous() &&
                  x_q.size(1) == w.size(2),
              "grouped_matmul_int8: contiguous int8 x_q [rows, K] and w [experts, N, K]");
  const int64_t rows = x_q.size(0), k_size = x_q.size(1), n_size = w.size(1);
  const int64_t experts = w.size(0);
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.is_contiguous() &&
                  x_scale.numel() == rows && w_scale.scalar_type() == at::kFloat &&
                  w_scale.is_contiguous() && w_scale.numel() == experts * n_size,
              "grouped_matmul_int8: float32 x_scale [rows] and w_scale [experts, N]");
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK(!has_bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                            bias->numel() == experts * n_size),
              "grouped_matmul_int8: float32 bias [experts, N]");
  const GroupedWork work = grouped_work(offsets, experts, rows, n_size, "grouped_matmul_int8");
  const int64_t* off = work.off();
  at::Tensor out = at::empty({rows, n_size}, x_scale.options());
  const int8_t* xp = x_q.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t num_tiles = static_cast<int64_t>(work.tiles.size());
  at::parallel_for(0, num_tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = work.tiles[i].expert;
      const int64_t n_begin = work.tiles[i].n_begin, n_end = work.tiles[i].n_end;
      const int8_t* we = wp + e * n_size * k_size;
      // dequantized as dequantize_ does it: float(acc) * x_scale * w_scale (+ bias)
      auto emit = [&](int64_t r, int64_t n, int32_t acc) {
        float y = static_cast<float>(acc) * xs[r] * ws[e * n_size + n];
        if (bp != nullptr) y += bp[e * n_size + n];
        op[r * n_size + n] = y;
      };
      int32_t acc[16];
      int64_t n = n_begin;
      for (; n + 4 <= n_end; n += 4) {
        int64_t r = off[e];
        for (; r + 4 <= off[e + 1]; r += 4) {
          expert_int8_dots<4, 4>(xp + r * k_size, k_size, we, n, acc);
          for (int64_t m = 0; m < 4; ++m) {
            for (int64_t c = 0; c < 4; ++c) emit(r + m, n + c, acc[m * 4 + c]);
          }
        }
        for (; r < off[e + 1]; ++r) {
          expert_int8_dots<1, 4>(xp + r * k_size, k_size, we, n, acc);
          for (int64_t c = 0; c < 4; ++c) emit(r, n + c, acc[c]);
        }
      }
      for (; n < n_end; ++n) {
        for (int64_t r = off[e]; r < off[e + 1]; ++r) {
          expert_int8_dots<1, 1>(xp + r * k_size, k_size, we, n, acc);
          emit(r, n, acc[0]);
        }
      }
    }
  });
  return out;
}

// ---- GGUF blocks kept quantized ------------------------------------------------------------
// Types by their ggml ids: Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8 (blocks of 32
// weights) and the K-quants Q4_K = 12, Q5_K = 13, Q6_K = 14 (super-blocks of 256). Every kernel
// walks a row in units of 32 weights: a block, or an eighth of a super-block. A unit is 32
// integers q, a scale per half (Q6_K scales each 16 weights) and, for the types that store one,
// an offset m (Q4_K/Q5_K's -dmin * min): weight = s * (q - bias) + m, in the float32 operations
// gguf-py's dequantize performs (half scales widened, K-quant scales d * sc first), so products
// differ from the dequantized model's only in summation order.
constexpr int64_t kGgufUnit = 32;

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof(bits));
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return _cvtsh_ss(bits);  // F16C: one instruction, the same value as c10::Half's
#else
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
#endif
}

struct GgufGeometry {
  int64_t values;  // weights per block (0: a type the kernels do not read)
  int64_t bytes;   // bytes per block
};

constexpr GgufGeometry gguf_geometry(int64_t type) {
  switch (type) {
    case 2: return {32, 18};     // Q4_0: half d, 16 bytes of nibbles
    case 3: return {32, 20};     // Q4_1: half d, half m, nibbles
    case 6: return {32, 22};     // Q5_0: half d, 32 fifth bits, nibbles
    case 7: return {32, 24};     // Q5_1: half d, half m, fifth bits, nibbles
    case 8: return {32, 34};     // Q8_0: half d, 32 int8
    case 12: return {256, 144};  // Q4_K: half d, half dmin, 12 bytes of 6-bit scales, nibbles
    case 13: return {256, 176};  // Q5_K: Q4_K's fields and 32 bytes of fifth bits
    case 14: return {256, 210};  // Q6_K: low nibbles, 2 high bits, 16 int8 scales, half d
    default: return {0, 0};
  }
}

// Calls f(std::integral_constant<int64_t, type>) so that each type's loops are compiled apart.
template <typename F>
void with_gguf_type(int64_t type, F&& f) {
  switch (type) {
    case 2: f(std::integral_constant<int64_t, 2>{}); break;
    case 3: f(std::integral_constant<int64_t, 3>{}); break;
    case 6: f(std::integral_constant<int64_t, 6>{}); break;
    case 7: f(std::integral_constant<int64_t, 7>{}); break;
    case 8: f(std::integral_constant<int64_t, 8>{}); break;
    case 12: f(std::integral_constant<int64_t, 12>{}); break;
    case 13: f(std::integral_constant<int64_t, 13>{}); break;
    case 14: f(std::integral_constant<int64_t, 14>{}); break;
    default: TORCH_CHECK(false, "unsupported GGUF type ", type);
  }
}

// Per type: the integers' bias (Q4_0 and Q5_0 store q + 8 and q + 16), whether the unit's
// integers are signed (Q8_0, and Q6_K's once its bias is taken off), whether it has an offset.
template <int64_t T> constexpr int kBias = T == 2 ? 8 : T == 6 ? 16 : 0;
template <int64_t T> constexpr bool kSigned = T == 8 || T == 14;
template <int64_t T> constexpr bool kHasOffset = T == 3 || T == 7 || T == 12 || T == 13;

struct UnitScales {
  float s0, s1;  // scales of weights 0-15 and 16-31
  float m;       // offset (kHasOffset)
};

// Q4_K / Q5_K: the 6-bit scale and min of sub-block j, packed in 12 bytes.
inline void k_scale_min(const uint8_t* s, int64_t j, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

template <int64_t T> constexpr int64_t kUnitsPerBlock = gguf_geometry(T).values / kGgufUnit;

// The scales of a block's units (a super-block's are unpacked once for its eight).
template <int64_t T>
inline void block_scales(const uint8_t* block, UnitScales* s) {
  if constexpr (T == 12 || T == 13) {
    const float d = half_to_float(block), dmin = half_to_float(block + 2);
    for (int64_t u = 0; u < 8; ++u) {
      int scale, min;
      k_scale_min(block + 4, u, scale, min);
      const float su = d * static_cast<float>(scale);
      s[u] = {su, su, -(dmin * static_cast<float>(min))};
    }
  } else if constexpr (T == 14) {
    const float d = half_to_float(block + 208);
    const int8_t* scales = reinterpret_cast<const int8_t*>(block + 192);
    for (int64_t u = 0; u < 8; ++u) {
      s[u] = {d * static_cast<float>(scales[2 * u]), d * static_cast<float>(scales[2 * u + 1]),
              0.0f};
    }
  } else {
    const float d = half_to_float(block);
    s[0] = {d, d, kHasOffset<T> ? half_to_float(block + 2) : 0.0f};
  }
}

// Unit b's 32 integers as stored, less Q6_K's bias (Q4_0's and Q5_0's stay in: the q8 product
// takes them off through the activations' block sums).
template <int64_t T>
inline void unit_ints_scalar(const uint8_t* block, int64_t u, int32_t* q) {
  if constexpr (T == 8) {
    for (int64_t j = 0; j < 32; ++j) q[j] = reinterpret_cast<const int8_t*>(block + 2)[j];
  } else if constexpr (T == 2 || T == 3 || T == 6 || T == 7) {
    constexpr int64_t high_at = T == 6 ? 2 : 4, nibbles_at = T == 2 ? 2 : T == 3 ? 4 : T == 6 ? 6 : 8;
    uint32_t high = 0;
    if constexpr (T == 6 || T == 7) std::memcpy(&high, block + high_at, sizeof(high));
    for (int64_t j = 0; j < 16; ++j) {
      q[j] = (block[nibbles_at + j] & 0x0F) | (((high >> j) & 1) << 4);
      q[j + 16] = (block[nibbles_at + j] >> 4) | (((high >> (j + 16)) & 1) << 4);
    }
  } else if constexpr (T == 12 || T == 13) {
    const uint8_t* qs = block + (T == 12 ? 16 : 48) + 32 * (u >> 1);
    for (int64_t j = 0; j < 32; ++j) {
      q[j] = (u & 1) ? qs[j] >> 4 : qs[j] & 0x0F;
      if constexpr (T == 13) q[j] |= ((block[16 + j] >> u) & 1) << 4;
    }
  } else {
    const int64_t h = u >> 2, t = u & 3;
    const uint8_t* ql = block + 64 * h + 32 * (t & 1);
    const uint8_t* qh = block + 128 + 32 * h;
    for (int64_t j = 0; j < 32; ++j) {
      const int32_t low = (t >> 1) ? ql[j] >> 4 : ql[j] & 0x0F;
      q[j] = (low | (((qh[j] >> (2 * t)) & 3) << 4)) - 32;
    }
  }
}

// gguf-py's float32 weights of one unit.
template <int64_t T>
inline void dequantize_unit(const uint8_t* block, int64_t u, const UnitScales& s, float* w) {
  int32_t q[kGgufUnit];
  unit_ints_scalar<T>(block, u, q);
  for (int64_t j = 0; j < kGgufUnit; ++j) {
    w[j] = (j < 16 ? s.s0 : s.s1) * static_cast<float>(q[j] - kBias<T>);
    if constexpr (kHasOffset<T>) w[j] += s.m;
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// 16 bytes of nibbles as 32 bytes in weight order (low nibbles are weights 0-15, high 16-31).
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
}

// Q5_0 / Q5_1's 32 fifth bits (little-endian) as 0x10 in the bytes whose bit is set.
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, sizeof(bits));
  const __m256i index = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                          0x0101010101010101, 0x0000000000000000);
  const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)), index);
  const __m256i select = _mm256_set1_epi64x(0x8040201008040201);
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
  return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

// The 32 bytes unit_ints_scalar computes, in registers.
template <int64_t T>
inline __m256i unit_ints(const uint8_t* block, int64_t u) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  if constexpr (T == 8) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2));
  } else if constexpr (T == 2 || T == 3) {
    return nibbles(block + (T == 2 ? 2 : 4));
  } else if constexpr (T == 6 || T == 7) {
    return _mm256_or_si256(nibbles(block + (T == 6 ? 6 : 8)), fifth_bits(block + (T == 6 ? 2 : 4)));
  } else if constexpr (T == 12 || T == 13) {
    const __m256i qs = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(block + (T == 12 ? 16 : 48) + 32 * (u >> 1)));
    __m256i q = _mm256_and_si256((u & 1) ? _mm256_srli_epi16(qs, 4) : qs, low4);
    if constexpr (T == 13) {
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 16));
      const __m256i bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi64_si128(u)),
                                           _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(bit, 4));
    }
    return q;
  } else {
    const int64_t h = u >> 2, t = u & 3;
    const __m256i ql = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(block + 64 * h + 32 * (t & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 128 + 32 * h));
    const __m256i low = _mm256_and_si256((t >> 1) ? _mm256_srli_epi16(ql, 4) : ql, low4);
    const __m256i high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi64_si128(2 * t)),
                                          _mm256_set1_epi8(3));
    return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)),
                           _mm256_set1_epi8(32));
  }
}

template <int64_t T>
inline __m256i widen_ints(__m128i bytes) {  // 8 of them, to int32, less the type's bias
  __m256i v = kSigned<T> ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
  if constexpr (kBias<T> != 0) v = _mm256_sub_epi32(v, _mm256_set1_epi32(kBias<T>));
  return v;
}
#endif

// One unit's 32 weights as float32 vectors, the values dequantize_unit writes.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kUnitVecs = 2;  // 16 lanes
using FVec = __m512;
template <int64_t T>
inline void load_unit(const uint8_t* block, int64_t u, const UnitScales& s, FVec* w) {
  const __m256i q = unit_ints<T>(block, u);
  for (int64_t h = 0; h < 2; ++h) {
    const __m128i part = h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
    __m512i v = kSigned<T> ? _mm512_cvtepi8_epi32(part) : _mm512_cvtepu8_epi32(part);
    if constexpr (kBias<T> != 0) v = _mm512_sub_epi32(v, _mm512_set1_epi32(kBias<T>));
    w[h] = _mm512_mul_ps(_mm512_set1_ps(h ? s.s1 : s.s0), _mm512_cvtepi32_ps(v));
    if constexpr (kHasOffset<T>) w[h] = _mm512_add_ps(w[h], _mm512_set1_ps(s.m));
  }
}
inline FVec fzero() { return _mm512_setzero_ps(); }
inline FVec fload(const float* p) { return _mm512_loadu_ps(p); }
inline void fstore(float* p, FVec v) { _mm512_storeu_ps(p, v); }
inline FVec ffma(FVec a, FVec b, FVec c) { return _mm512_fmadd_ps(a, b, c); }
inline float fsum(FVec v) { return _mm512_reduce_add_ps(v); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kUnitVecs = 4;  // 8 lanes
using FVec = __m256;
template <int64_t T>
inline void load_unit(const uint8_t* block, int64_t u, const UnitScales& s, FVec* w) {
  const __m256i q = unit_ints<T>(block, u);
  const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int64_t h = 0; h < 4; ++h) {
    w[h] = _mm256_mul_ps(_mm256_set1_ps(h < 2 ? s.s0 : s.s1),
                         _mm256_cvtepi32_ps(widen_ints<T>(parts[h])));
    if constexpr (kHasOffset<T>) w[h] = _mm256_add_ps(w[h], _mm256_set1_ps(s.m));
  }
}
inline FVec fzero() { return _mm256_setzero_ps(); }
inline FVec fload(const float* p) { return _mm256_loadu_ps(p); }
inline void fstore(float* p, FVec v) { _mm256_storeu_ps(p, v); }
inline FVec ffma(FVec a, FVec b, FVec c) { return _mm256_fmadd_ps(a, b, c); }
inline float fsum(FVec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}
#else
constexpr int64_t kUnitVecs = 32;  // scalar "vectors" of one lane
using FVec = float;
template <int64_t T>
inline void load_unit(const uint8_t* block, int64_t u, const UnitScales& s, FVec* w) {
  dequantize_unit<T>(block, u, s, w);
}
inline FVec fzero() { return 0.0f; }
inline FVec fload(const float* p) { return *p; }
inline void fstore(float* p, FVec v) { *p = v; }
inline FVec ffma(FVec a, FVec b, FVec c) { return a * b + c; }
inline float fsum(FVec v) { return v; }
#endif
constexpr int64_t kVecLanes = kGgufUnit / kUnitVecs;

// Rows r0 .. r0 + R of x against weight row `w_row`: each unit dequantized once into
// registers, then multiplied into every row's accumulators.
template <int64_t T, int64_t R>
void gguf_row_dots(const uint8_t* w_row, const float* x, int64_t k_size, float* out,
                   int64_t out_stride) {
  FVec acc[R][2];
  for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = fzero();
  FVec w[kUnitVecs];
  UnitScales scales[kUnitsPerBlock<T>];
  constexpr GgufGeometry g = gguf_geometry(T);
  for (int64_t blk = 0; blk < k_size / g.values; ++blk) {
    const uint8_t* block = w_row + blk * g.bytes;
    block_scales<T>(block, scales);
    for (int64_t u = 0; u < kUnitsPerBlock<T>; ++u) {
      load_unit<T>(block, u, scales[u], w);
      const int64_t k = blk * g.values + u * kGgufUnit;
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * k_size + k;
        for (int64_t v = 0; v < kUnitVecs; ++v) {
          acc[r][v & 1] = ffma(w[v], fload(xr + v * kVecLanes), acc[r][v & 1]);
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) out[r * out_stride] = fsum(acc[r][0]) + fsum(acc[r][1]);
}

// The checks every GGUF op makes: w holds rows of whole blocks of `type` for K inputs.
void check_gguf_rows(const char* op, const at::Tensor& w, int64_t type, int64_t k_size) {
  const GgufGeometry g = gguf_geometry(type);
  TORCH_CHECK(g.values > 0, op, ": unsupported GGUF type ", type);
  TORCH_CHECK(k_size % g.values == 0, op, ": K must be a multiple of ", g.values, ", got ",
              k_size);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.size(1) == k_size / g.values * g.bytes,
              op, ": contiguous uint8 w [N, K / ", g.values, " * ", g.bytes, "]");
}

void check_gguf_operands(const char* op, const at::Tensor& x, const at::Tensor& w,
                         int64_t type, const at::Tensor& out, int64_t col) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": contiguous float32 x [rows, K]");
  check_gguf_rows(op, w, type, x.size(1));
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.size(0) == x.size(0) && col >= 0 && col + w.size(0) <= out.size(1),
              op, ": contiguous float32 out [rows, >= col + N]");
}

// Activation rows per pass over a weight row: as many as the accumulators fit in registers
// (AVX-512: 8 rows x 2 of 32 zmm; AVX2: 4 x 2 of 16 ymm, with the unit's 4). The rows go
// through kWeightTile weight rows at a time, so a tile of rows stays in L1 across them (all
// rows against each weight row in turn fell off L1 past ~20 rows of 576: 2x the time).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kRowDots = 8;
#else
constexpr int64_t kRowDots = 4;
#endif
constexpr int64_t kWeightTile = 32;

// Calls f(std::integral_constant<int64_t, rows>) for 1 <= rows <= R: a remainder of rows in one
// pass (a speculative step's 5 rows unpack the weights once, not for 4 and then 1); both GGUF
// kernels dispatch their row counts through it.
template <int64_t R, typename F>
void with_rows(int64_t rows, F&& f) {
  if constexpr (R > 0) {
    if (rows == R) {
      f(std::integral_constant<int64_t, R>{});
    } else {
      with_rows<R - 1>(rows, f);
    }
  }
}

// x [rows, K] float32 times GGUF-quantized w [N, K / values blocks] (raw bytes, one weight row
// per tensor row), written into out[:, col : col + N] (a fused layer's parts fill one output):
// threads split the weight rows, each unit is dequantized in registers (as gguf-py does, in
// float32) and multiplied into up to kRowDots activation rows at a time, so the quantized bytes
// are unpacked once per kRowDots rows. Each row's sums are the same however many rows come. The
// AVX2 build's prefill is faster through a dequantized GEMM (layers/gguf_layers.py picks).
void gguf_matmul(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out,
                 int64_t col) {
  check_gguf_operands("gguf_matmul", x, w, type, out, col);
  const int64_t rows = x.size(0), k_size = x.size(1), n_size = w.size(0), row_bytes = w.size(1);
  const int64_t out_stride = out.size(1);
  const float* xp = x.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>() + col;
  with_gguf_type(type, [&](auto t) {
    constexpr int64_t T = decltype(t)::value;
    at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n0 = begin; n0 < end; n0 += kWeightTile) {
        const int64_t n1 = std::min(end, n0 + kWeightTile);
        // one tile of R rows against the weight tile's rows
        auto tile = [&](auto rows_now, int64_t r) {
          constexpr int64_t R = decltype(rows_now)::value;
          for (int64_t n = n0; n < n1; ++n) {
            gguf_row_dots<T, R>(wp + n * row_bytes, xp + r * k_size, k_size,
                                op + r * out_stride + n, out_stride);
          }
        };
        int64_t r = 0;
        for (; r + kRowDots <= rows; r += kRowDots) {
          tile(std::integral_constant<int64_t, kRowDots>{}, r);
        }
        if (r < rows) with_rows<kRowDots - 1>(rows - r, [&](auto rest) { tile(rest, r); });
      }
    });
  });
}

// ---- GGUF blocks times q8 activations (llama.cpp's dot products) --------------------------
// Each activation row is quantized per 32-value block as llama.cpp's Q8_0 / Q8_1 do (d = amax /
// 127, q = x / d rounded to nearest, ties to even as its vector code rounds; float32 scales
// where it keeps halves), with the block's d * sum(q) for the weights' offsets. A unit's product
// is an exact int32 dot of the two units' integers (per half where Q6_K's scales differ),
// scaled by both d's; the weight's offset m adds m * that sum, and a bias (Q4_0's nibbles are
// stored +8, Q5_0's +16) subtracts bias * d * it.
void quantize_q8_blocks(const float* x, int64_t k_size, int8_t* q, float* d, float* s) {
  for (int64_t b = 0; b < k_size / kGgufUnit; ++b) {
    const float* xb = x + b * kGgufUnit;
    float amax = 0.0f;
    for (int64_t j = 0; j < kGgufUnit; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.0f, inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kGgufUnit; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * inverse));
      q[b * kGgufUnit + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Unsigned bytes times signed bytes, summed in fours: 8 int32 lanes, lanes 0-3 from bytes 0-15
// (2 * 128 * 127 fits int16).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // one instruction, the same sums
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
inline float hsum8(__m256 v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_shuffle_ps(b, b, 1)));
}

template <int64_t T, int64_t R>
void gguf_q8_dots(const uint8_t* w_row, const int8_t* xq, const float* xd, const float* xs,
                  int64_t k_size, float* out, int64_t out_stride) {
  const int64_t units = k_size / kGgufUnit;
  __m256 acc[R];
  float offset[R];
  for (int64_t r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    offset[r] = 0.0f;
  }
  UnitScales scales[kUnitsPerBlock<T>];
  for (int64_t b = 0; b < units; ++b) {
    const int64_t u = b % kUnitsPerBlock<T>;
    const uint8_t* block = w_row + b / kUnitsPerBlock<T> * gguf_geometry(T).bytes;
    if (u == 0) block_scales<T>(block, scales);
    const __m256i w = unit_ints<T>(block, u);
    const UnitScales& s = scales[u];
    // signed weights: |w| times x with w's sign, so maddubs sees unsigned * signed
    const __m256i w_abs = kSigned<T> ? _mm256_abs_epi8(w) : w;
    for (int64_t r = 0; r < R; ++r) {
      __m256i x = _mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xq + r * k_size + b * kGgufUnit));
      if constexpr (kSigned<T>) x = _mm256_sign_epi8(x, w);
      const __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(w_abs, x));
      const float d = xd[r * units + b];
      const __m256 scale = T == 14 ? _mm256_set_m128(_mm_set1_ps(s.s1 * d), _mm_set1_ps(s.s0 * d))
                                   : _mm256_set1_ps(s.s0 * d);
      acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
      if constexpr (kHasOffset<T>) offset[r] += s.m * xs[r * units + b];
      if constexpr (kBias<T> != 0) {
        offset[r] -= static_cast<float>(kBias<T>) * s.s0 * xs[r * units + b];
      }
    }
  }
  for (int64_t r = 0; r < R; ++r) out[r * out_stride] = hsum8(acc[r]) + offset[r];
}
#else
template <int64_t T, int64_t R>
void gguf_q8_dots(const uint8_t* w_row, const int8_t* xq, const float* xd, const float* xs,
                  int64_t k_size, float* out, int64_t out_stride) {
  const int64_t units = k_size / kGgufUnit;
  int32_t q[kGgufUnit];
  UnitScales scales[kUnitsPerBlock<T>];
  for (int64_t r = 0; r < R; ++r) {
    float total = 0.0f;
    for (int64_t b = 0; b < units; ++b) {
      const int64_t u = b % kUnitsPerBlock<T>;
      const uint8_t* block = w_row + b / kUnitsPerBlock<T> * gguf_geometry(T).bytes;
      if (u == 0) block_scales<T>(block, scales);
      unit_ints_scalar<T>(block, u, q);
      const UnitScales& s = scales[u];
      const int8_t* x = xq + r * k_size + b * kGgufUnit;
      int32_t dots[2] = {0, 0};
      for (int64_t j = 0; j < kGgufUnit; ++j) dots[j >= 16] += (q[j] - kBias<T>) * x[j];
      const float d = xd[r * units + b];
      total += static_cast<float>(dots[0]) * (s.s0 * d) + static_cast<float>(dots[1]) * (s.s1 * d);
      if (kHasOffset<T>) total += s.m * xs[r * units + b];
    }
    out[r * out_stride] = total;
  }
}
#endif

// Up to kQ8Rows activation rows per pass over a weight row: its units are unpacked once for
// all of them (a speculative step's 5 rows cost little more than 1).
constexpr int64_t kQ8Rows = 8;

// x [rows, K] float32, quantized here to q8 blocks, times GGUF-quantized w [N, K / values
// blocks] into out[:, col : col + N], as gguf_matmul; not the float32 product: llama.cpp's
// numerics.
void gguf_matmul_q8(const at::Tensor& x, const at::Tensor& w, int64_t type, at::Tensor& out,
                    int64_t col) {
  check_gguf_operands("gguf_matmul_q8", x, w, type, out, col);
  const int64_t rows = x.size(0), k_size = x.size(1), n_size = w.size(0), row_bytes = w.size(1);
  const int64_t units = k_size / kGgufUnit;
  std::vector<int8_t> xq(rows * k_size);
  std::vector<float> xd(rows * units), xs(rows * units);
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      quantize_q8_blocks(xp + r * k_size, k_size, xq.data() + r * k_size, xd.data() + r * units,
                         xs.data() + r * units);
    }
  });
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>() + col;
  const int64_t stride = out.size(1);
  with_gguf_type(type, [&](auto t) {
    constexpr int64_t T = decltype(t)::value;
    at::parallel_for(0, n_size, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t r = 0; r < rows; r += kQ8Rows) {
          with_rows<kQ8Rows>(std::min(kQ8Rows, rows - r), [&](auto count) {
            constexpr int64_t R = decltype(count)::value;
            gguf_q8_dots<T, R>(wp + n * row_bytes, xq.data() + r * k_size, xd.data() + r * units,
                               xs.data() + r * units, k_size, op + r * stride + n, stride);
          });
        }
      }
    });
  });
}

// The float32 weights of GGUF rows [N, K / values blocks] -> [N, K] (tests, and layers that
// need the weights themselves: an embedding's looked-up rows, a prefill's GEMM).
at::Tensor gguf_dequantize(const at::Tensor& w, int64_t type, int64_t k_size) {
  check_gguf_rows("gguf_dequantize", w, type, k_size);
  at::Tensor out = at::empty({w.size(0), k_size}, w.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  const int64_t row_bytes = w.size(1), units = k_size / kGgufUnit;
  with_gguf_type(type, [&](auto t) {
    constexpr int64_t T = decltype(t)::value;
    at::parallel_for(0, w.size(0), 16, [&](int64_t begin, int64_t end) {
      FVec v[kUnitVecs];
      UnitScales scales[kUnitsPerBlock<T>];
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t b = 0; b < units; ++b) {
          const int64_t u = b % kUnitsPerBlock<T>;
          const uint8_t* block = wp + n * row_bytes + b / kUnitsPerBlock<T> * gguf_geometry(T).bytes;
          if (u == 0) block_scales<T>(block, scales);
          load_unit<T>(block, u, scales[u], v);
          float* dst = op + n * k_size + b * kGgufUnit;
          for (int64_t i = 0; i < kUnitVecs; ++i) fstore(dst + i * kVecLanes, v[i]);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lmserve_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor token_index, Tensor(a!) out, float scale, int window, "
      "float soft_cap, Tensor? sinks) -> ()");
  m.def(
      "store_kv(Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("grouped_matmul(Tensor x, Tensor w, Tensor offsets) -> Tensor");
  m.def(
      "grouped_matmul_int8(Tensor x_q, Tensor x_scale, Tensor w, Tensor w_scale, Tensor offsets, "
      "Tensor? bias) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor signed_sin) -> ()");
  m.def("gguf_matmul(Tensor x, Tensor w, int type, Tensor(a!) out, int col) -> ()");
  m.def("gguf_dequantize(Tensor w, int type, int k) -> Tensor");
  m.def("gguf_matmul_q8(Tensor x, Tensor w, int type, Tensor(a!) out, int col) -> ()");
  m.def(
      "dequantize_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(lmserve_cpu, CPU, m) {
  m.impl("decode_attention", decode_attention);
  m.impl("store_kv", store_kv);
  m.impl("quantize_rows", quantize_rows);
  m.impl("dequantize_", dequantize_);
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm_", add_rms_norm_);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("grouped_matmul", grouped_matmul);
  m.impl("grouped_matmul_int8", grouped_matmul_int8);
  m.impl("rotary_", rotary_);
  m.impl("gguf_matmul", gguf_matmul);
  m.impl("gguf_dequantize", gguf_dequantize);
  m.impl("gguf_matmul_q8", gguf_matmul_q8);
}
