// CPU kernels for the hot path, built at first use by lmserve/kernels/cpu_ops.py.
//
// Each replaces a chain of small torch ops whose per-op overhead and extra passes over memory
// dominated a decode step on a 2-core CPU (SmolLM2-135M, batch 64): paged decode attention
// (a gather + SDPA, or ~15 batched-matmul and merge ops), K/V stores (two index_put), and
// int8 dynamic quantization around `torch._int_mm` (~10 elementwise ops per linear layer).
// SIMD through ATen's Vectorized<float>, threads through at::parallel_for (torch's own pool).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Limits of the register tiles below; cpu_ops.py checks them before calling.
constexpr int64_t kMaxGroup = 16;    // query heads per KV head
constexpr int64_t kMaxVectors = 32;  // head_dim / kLanes

inline float hsum(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// One request's decode query heads that share KV head `h`, against all its keys: an online
// softmax over the blocks, so each K/V byte is read once. NV = head_dim / kLanes when known at
// compile time (the common sizes), else 0 and `nv` at run time.
template <int64_t NV>
void attend_decode_row(const float* q, int64_t q_head_stride, const float* key_cache,
                       const float* value_cache, const int32_t* blocks, int64_t seq_len,
                       int64_t kv_heads, int64_t h, int64_t block_size, int64_t group,
                       int64_t nv_runtime, float scale, float* scores, float* out,
                       int64_t out_head_stride) {
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
    row_max[g] = -std::numeric_limits<float>::infinity();
    row_sum[g] = 0.f;
  }
  const int64_t block_elems = block_size * head_dim;
  const int64_t num_blocks = (seq_len + block_size - 1) / block_size;
  for (int64_t b = 0; b < num_blocks; ++b) {
    const int64_t base = (static_cast<int64_t>(blocks[b]) * kv_heads + h) * block_elems;
    const float* keys = key_cache + base;
    const float* values = value_cache + base;
    const int64_t n = std::min(block_size, seq_len - b * block_size);
    for (int64_t j = 0; j < n; ++j) {
      Vec k[NV > 0 ? NV : kMaxVectors];
      for (int64_t v = 0; v < nv; ++v) k[v] = Vec::loadu(keys + j * head_dim + v * kLanes);
      for (int64_t g = 0; g < group; ++g) {
        Vec dot = qv[g][0] * k[0];
        for (int64_t v = 1; v < nv; ++v) dot = at::vec::fmadd(qv[g][v], k[v], dot);
        scores[g * block_size + j] = hsum(dot);
      }
    }
    for (int64_t g = 0; g < group; ++g) {
      float* s = scores + g * block_size;
      float new_max = row_max[g];
      for (int64_t j = 0; j < n; ++j) new_max = std::max(new_max, s[j]);
      const float correction = std::exp(row_max[g] - new_max);
      row_max[g] = new_max;
      float sum = 0.f;
      int64_t j = 0;
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
    for (int64_t j = 0; j < n; ++j) {
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
// row of `out` is written.
void decode_attention(const at::Tensor& q, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& block_table,
                      const at::Tensor& seq_lens, const at::Tensor& token_index, at::Tensor& out,
                      double scale) {
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
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * block_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads;
      const float* qh = q_ptr + tokens[r] * q.stride(0) + h * group * q.stride(1);
      float* oh = out_ptr + tokens[r] * out.stride(0) + h * group * out.stride(1);
      const int32_t* blocks = table + r * max_blocks;
      switch (nv) {
#define LMSERVE_ATTEND(N)                                                                     \
  case N:                                                                                     \
    attend_decode_row<N>(qh, q.stride(1), k_ptr, v_ptr, blocks, lens[r], kv_heads, h,         \
                         block_size, group, nv, fscale, scores.data(), oh, out.stride(1)); \
    break;
        LMSERVE_ATTEND(4)
        LMSERVE_ATTEND(8)
        LMSERVE_ATTEND(16)
#undef LMSERVE_ATTEND
        default:
          attend_decode_row<0>(qh, q.stride(1), k_ptr, v_ptr, blocks, lens[r], kv_heads, h,
                               block_size, group, nv, fscale, scores.data(), oh, out.stride(1));
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
      alignas(64) float rounded[kLanes];
      for (; c + kLanes <= cols; c += kLanes) {
        (Vec::loadu(row + c) / vscale).round().store(rounded);
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
    alignas(64) float converted[kLanes];
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* in = in_ptr + r * cols;
      float* o = out_ptr + r * cols;
      const Vec row_scale(xs[r]);
      int64_t c = 0;
      for (; c + kLanes <= cols; c += kLanes) {
        for (int64_t i = 0; i < kLanes; ++i) converted[i] = static_cast<float>(in[c + i]);
        Vec y = Vec::loadu(converted) * row_scale * Vec::loadu(ws + c);
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

}  // namespace

TORCH_LIBRARY(lmserve_cpu, m) {
  m.def(
      "decode_attention(Tensor q, Tensor key_cache, Tensor value_cache, Tensor block_table, "
      "Tensor seq_lens, Tensor token_index, Tensor(a!) out, float scale) -> ()");
  m.def(
      "store_kv(Tensor k, Tensor v, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "dequantize_(Tensor(a!) acc, Tensor x_scale, Tensor w_scale, Tensor? bias) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(lmserve_cpu, CPU, m) {
  m.impl("decode_attention", decode_attention);
  m.impl("store_kv", store_kv);
  m.impl("quantize_rows", quantize_rows);
  m.impl("dequantize_", dequantize_);
}
