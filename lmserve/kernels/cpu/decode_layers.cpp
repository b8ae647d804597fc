// A decode step's decoder layers in one call (layers/decode_layers.py builds its arguments).
//
// One token per row makes each layer's work small (SmolLM2: ~100 us), and the Python around its
// ten kernel calls cost half as much again. This loop makes the same calls, in the same order
// with the same operands, through the dispatcher: the numbers are the Python path's bit for bit.
// Llama-family layers (pre-norm, SiLU) and Gemma 2/3's (pre- and post-norms, GELU-tanh, q/k
// norms), with GGUF-block, int8 or float32 linears and paged decode attention (ops.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Matmul = void(const at::Tensor&, const at::Tensor&, int64_t, at::Tensor&, int64_t);

struct Ops {
  c10::TypedOperatorHandle<Matmul> gguf_matmul = handle<Matmul>("lmserve_cpu::gguf_matmul");
  c10::TypedOperatorHandle<Matmul> gguf_matmul_q8 = handle<Matmul>("lmserve_cpu::gguf_matmul_q8");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm =
      handle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("lmserve_cpu::rms_norm");
  c10::TypedOperatorHandle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>
      add_rms_norm = handle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "lmserve_cpu::add_rms_norm_");
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&)> rotary =
      handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&)>("lmserve_cpu::rotary_");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                const at::Tensor&)>
      store_kv = handle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                             const at::Tensor&)>("lmserve_cpu::store_kv");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::Tensor&, double, int64_t, double,
                                const std::optional<at::Tensor>&)>
      decode_attention =
          handle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, at::Tensor&, double, int64_t, double,
                      const std::optional<at::Tensor>&)>("lmserve_cpu::decode_attention");
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)> quantize_rows =
      handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>("lmserve_cpu::quantize_rows");
  c10::TypedOperatorHandle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const std::optional<at::Tensor>&)>
      dequantize = handle<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&)>("lmserve_cpu::dequantize_");
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul =
      handle<at::Tensor(const at::Tensor&)>("lmserve_cpu::silu_and_mul");
};

const Ops& ops() {
  static const Ops table;  // looked up once, after both files' registrations
  return table;
}

// Linear kinds, as the Python layers compute them: GGUF blocks (GGUFLinear), int8 weights per
// output channel with activations quantized per row (Int8Linear), float32 [in, out] (Linear).
constexpr int64_t kBlocks = 0, kInt8 = 1, kFloat = 2;

// Reads the linears' plans in turn: per linear [kind, out_features, has_bias], then for GGUF
// blocks the part count and (type, first output column) per part; its weights in order: each
// part's blocks (GGUF), or the int8 weight [out, in] and its scales, or the weight [in, out];
// then the bias.
struct Linears {
  const Ops& o;
  c10::ArrayRef<int64_t> plan;
  at::TensorList weights;
  bool q8;
  size_t p = 0, w = 0;

  at::Tensor operator()(const at::Tensor& x) {
    const int64_t kind = plan[p], out_features = plan[p + 1], has_bias = plan[p + 2];
    p += 3;
    if (kind == kInt8) {
      const at::Tensor &weight = weights[w], &weight_scale = weights[w + 1];
      w += 2;
      const std::optional<at::Tensor> bias =
          has_bias ? std::optional<at::Tensor>(weights[w++]) : std::nullopt;
      auto [x_q, x_scale] = o.quantize_rows.call(x);
      at::Tensor acc = at::_int_mm(x_q, weight.t());
      return o.dequantize.call(acc, x_scale, weight_scale, bias);
    }
    if (kind == kFloat) {
      const at::Tensor& weight = weights[w++];
      return has_bias ? at::addmm(weights[w++], x, weight) : at::matmul(x, weight);
    }
    TORCH_CHECK(kind == kBlocks, "decode_layers: unknown linear kind ", kind);
    const int64_t parts = plan[p++];
    at::Tensor out = at::empty({x.size(0), out_features}, x.options());
    const auto& matmul = q8 ? o.gguf_matmul_q8 : o.gguf_matmul;
    for (int64_t i = 0; i < parts; ++i, p += 2) {
      matmul.call(x, weights[w++], plan[p], out, plan[p + 1]);
    }
    if (has_bias) out.add_(weights[w++]);
    return out;
  }
};

// x [rows, hidden]: the embedded tokens, then the residual stream (added into in place, as the
// Python path's first layer keeps it); returns (the last MLP's output, the residual stream), as
// the Python layers leave them for the final norm. Per layer: `norms` holds the norm weights
// (Llama: input, post-attention; Gemma: input, post-attention, pre-MLP, post-MLP and with
// `qk_norm` q's and k's, its (1 + w) scales), `kv_caches` the [2, blocks, kv_heads,
// block_size, head_dim] cache, `windows` the sliding window (0: none) and `rope_of` which
// (cos, signed_sin) pair of `ropes` rotates it. The decode rows' block table, lengths and token
// indices are the attention backend's (attention/cpu.py).
std::tuple<at::Tensor, at::Tensor> decode_layers(
    const at::Tensor& x, at::TensorList ropes, c10::ArrayRef<int64_t> rope_of,
    at::TensorList norms, at::TensorList weights, c10::ArrayRef<int64_t> plan,
    at::TensorList kv_caches, c10::ArrayRef<int64_t> windows, const at::Tensor& block_table,
    const at::Tensor& seq_lens, const at::Tensor& token_index, const at::Tensor& slot_mapping,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale, double soft_cap,
    double eps, bool gemma, bool qk_norm, bool q8) {
  const Ops& o = ops();
  const size_t layers = kv_caches.size();
  const size_t per_layer = gemma ? (qk_norm ? 6 : 4) : 2;
  TORCH_CHECK(norms.size() == per_layer * layers && windows.size() == layers &&
                  rope_of.size() == layers && (gemma || !qk_norm),
              "decode_layers: the norms, windows and ropes of every layer");
  const int64_t rows = x.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  Linears linear{o, plan, weights, q8};
  at::Tensor residual = x, hidden;
  const std::optional<at::Tensor> no_sinks;
  for (size_t i = 0; i < layers; ++i) {
    const at::Tensor* norm = &norms[per_layer * i];
    const at::Tensor &cos = ropes[2 * rope_of[i]], &signed_sin = ropes[2 * rope_of[i] + 1];
    hidden = i == 0 ? o.rms_norm.call(residual, norm[0], eps)
                    : o.add_rms_norm.call(residual, hidden, norm[0], eps);
    at::Tensor qkv = linear(hidden), q, k;
    const at::Tensor v =
        qkv.narrow(1, q_size + kv_size, kv_size).view({rows, num_kv_heads, head_dim});
    if (!gemma) {  // q and k heads adjacent: rotated in one go, in place
      at::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({rows, -1, head_dim});
      o.rotary.call(qk, cos, signed_sin);
      q = qk.narrow(1, 0, num_heads);
      k = qk.narrow(1, num_heads, num_kv_heads);
    } else {
      q = qkv.narrow(1, 0, q_size).view({rows, num_heads, head_dim});
      k = qkv.narrow(1, q_size, kv_size).view({rows, num_kv_heads, head_dim});
      if (qk_norm) {
        q = o.rms_norm.call(q.reshape({-1, head_dim}), norm[4], eps).view(q.sizes());
        k = o.rms_norm.call(k.reshape({-1, head_dim}), norm[5], eps).view(k.sizes());
      } else {
        q = q.contiguous();
        k = k.contiguous();
      }
      o.rotary.call(q, cos, signed_sin);
      o.rotary.call(k, cos, signed_sin);
    }
    at::Tensor key_cache = kv_caches[i].select(0, 0), value_cache = kv_caches[i].select(0, 1);
    o.store_kv.call(k, v, key_cache, value_cache, slot_mapping);
    at::Tensor attn = at::empty(q.sizes(), q.options());
    o.decode_attention.call(q, key_cache, value_cache, block_table, seq_lens, token_index, attn,
                            scale, windows[i], soft_cap, no_sinks);
    at::Tensor out = linear(attn.view({rows, q_size}));
    if (!gemma) {
      hidden = o.add_rms_norm.call(residual, out, norm[1], eps);
      hidden = linear(o.silu_and_mul.call(linear(hidden)));
    } else {
      hidden = o.add_rms_norm.call(residual, o.rms_norm.call(out, norm[1], eps), norm[2], eps);
      const at::Tensor gate_up = linear(hidden);
      const int64_t width = gate_up.size(1) / 2;
      const at::Tensor mixed =
          at::gelu(gate_up.narrow(1, 0, width), "tanh") * gate_up.narrow(1, width, width);
      hidden = o.rms_norm.call(linear(mixed), norm[3], eps);
    }
  }
  TORCH_CHECK(linear.p == plan.size() && linear.w == weights.size(),
              "decode_layers: the plan does not match the weights");
  return {hidden, residual};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmserve_cpu, m) {
  m.def(
      "decode_layers(Tensor(a!) x, Tensor[] ropes, int[] rope_of, Tensor[] norms, "
      "Tensor[] weights, int[] plan, Tensor[] kv_caches, int[] windows, Tensor block_table, "
      "Tensor seq_lens, Tensor token_index, Tensor slot_mapping, int num_heads, "
      "int num_kv_heads, int head_dim, float scale, float soft_cap, float eps, bool gemma, "
      "bool qk_norm, bool q8) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lmserve_cpu, CPU, m) { m.impl("decode_layers", decode_layers); }
