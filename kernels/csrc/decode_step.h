// One decode step of a Llama-family decoder in bf16 on the CPU, in one call,
// and the CPU ops around it (GEMV, packing, packed GEMM, row ops), written once
// over a kernel set K: the step's logic is here, the micro-kernels (GEMM tiles,
// row ops, attention) are K's. isa_avx512bf16.cpp instantiates it with the
// AVX512-BF16 kernels, isa_portable.cpp with the kernels of portable_kernels.h
// compiled for scalar, AVX2, AVX-512F or NEON; each registers the same ops in
// a namespace of its own (wallperf_<isa>), and kernels/cpu_linear.py picks one.
//
// A kernel set K provides: kName, cpu_ok() (whether this CPU executes it),
// kPanel (pack width), kPackAbove (rows of x above which linear_bf16 packs W
// and runs the packed GEMM rather than the GEMV), pack, gemv, gemm_packed,
// rms_norm_rows, swiglu, add_rounded, exp_shifted_sum and attend.
//
// At batch 1 a step of SmolLM2-135M is ~270 MB of weights streamed through 121
// GEMVs, plus ~20 small ops per block (norms, RoPE, the cache write, attention,
// SwiGLU, residual adds). Issued one by one from Python, those small ops and the
// dispatch around each GEMV cost as much as the GEMVs' memory traffic. Here the
// whole step runs in C++: its GEMMs, each over all threads, and everything
// between them on contiguous scratch vectors. The projection and
// head weights come packed (wallperf::pack_bf16, done once by FusedDecoder), so
// that every weight loaded serves all rows of the step.
//
// The numerics follow the PyTorch path (sut/models/llama.py) op for op: bf16
// activations between ops, rounded where PyTorch rounds (RMSNorm normalises in
// fp32, rounds, then scales by the bf16 weight; RoPE and SwiGLU compute in fp32
// and round; residual adds round), fp32 attention over the bf16 cache, bf16
// logits returned as fp32. The KV cache is the engine's paged pool:
// (layers, blocks, block_size, kv_heads, head_dim), addressed through each
// row's block table; this step's keys and values are written at the row's
// position before it attends. Q/K/V biases (Qwen2), when given, are added to
// the rounded GEMV output and rounded again, as `y + bias` does in bf16.
//
// An fp8 cache (e4m3fn, or e4m3fnuz as MI300X stores it) holds one fp32 scale
// per (slot, KV head), as sut/paged_cache.py writes it: each new key or value
// vector is scaled so its largest magnitude is the format's maximum, rounded by
// c10's own conversion (torch's cast), and read back through a 256-entry table
// times its scale, in fp32. No fp8 instruction is needed: this is emulation, with
// the bytes fp8 hardware would hold.
#pragma once
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <vector>

#include "pack.h"
#include "step_types.h"

namespace wallperf_step {

// Where the fused step's time goes, phase by phase, when switched on
// (wallperf::step_profile: `wallperf bench decode` prints it): wall seconds per
// phase summed over calls, for this library's kernel set. Off, each phase
// costs one relaxed load of the switch.
enum StepPhase { kNorm, kQkv, kRopeCache, kAttend, kOProj, kResidual, kGateUp, kSwiglu, kDown, kHead, kPhases };
inline std::atomic<bool> g_profile_on{false};
inline double g_profile_s[kPhases] = {};
inline int64_t g_profile_calls = 0;

struct PhaseClock {
  const bool on = g_profile_on.load(std::memory_order_relaxed);
  std::chrono::steady_clock::time_point last = on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  void mark(StepPhase phase) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_profile_s[phase] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
};

template <class K>
void check_cpu(const char* op) {
  TORCH_CHECK(K::cpu_ok(), "wallperf_", K::kName, "::", op, " needs a CPU that executes ", K::kName,
              " instructions; this one does not");
}

// HF layout: the two halves of each head are the pairs rotated together.
void rope_heads(bf16* x, int64_t heads, int64_t D, const float* cos_, const float* sin_) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    bf16* v = x + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const float a = to_f(v[i]), b = to_f(v[i + half]);
      v[i] = to_bf16(a * cos_[i] - b * sin_[i]);
      v[i + half] = to_bf16(b * cos_[i] + a * sin_[i]);
    }
  }
}

inline const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }
inline const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<bf16>()); }

// A (rows, cols) weight packed by wallperf::pack_bf16; cols must be even, as
// the activations it multiplies are not padded.
inline void check_weight(const at::Tensor& w, int64_t rows, int64_t cols, const char* name, size_t layer) {
  const int64_t packed_rows = wallperf_pack::padded_n(rows);
  TORCH_CHECK(cols % 2 == 0 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) == packed_rows && w.size(1) == cols,
              "wallperf::llama_decode_bf16: layer ", layer, " ", name, " must be a (", rows, ", ", cols,
              ") bfloat16 weight packed by wallperf::pack_bf16, shaped (", packed_rows, ", ", cols, "), with ",
              cols, " even; got ", w.scalar_type(), " ", w.sizes());
}

inline void check_vector(const at::Tensor& w, int64_t n, const char* name, size_t layer) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == n,
              "wallperf::llama_decode_bf16: layer ", layer, " ", name, " must be a contiguous bfloat16 vector of ",
              n, ", got ", w.scalar_type(), " ", w.sizes());
}

template <class K>
at::Tensor llama_decode_bf16(const at::Tensor& x_in, at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList o_w,
                             at::TensorList gate_up_w, at::TensorList down_w, at::TensorList ln1,
                             at::TensorList ln2, const at::Tensor& norm, const at::Tensor& head,
                             const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             const std::optional<at::Tensor>& k_centre, const at::Tensor& block_tables,
                             const at::Tensor& positions, const at::Tensor& inv_freq, int64_t n_heads,
                             int64_t n_kv_heads, double eps, const std::optional<at::Tensor>& logits_rows) {
  check_cpu<K>("llama_decode_bf16");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2, "x must be bfloat16 (M, hidden)");
  const size_t L = qkv_w.size();
  TORCH_CHECK(o_w.size() == L && gate_up_w.size() == L && down_w.size() == L && ln1.size() == L &&
                  ln2.size() == L && (qkv_b.empty() || qkv_b.size() == L),
              "wallperf::llama_decode_bf16: every per-layer weight list needs ", L, " entries (qkv_bias: 0 or ", L,
              ")");
  const auto kv_type = k_cache.scalar_type();
  const bool fp8 = kv_type == at::kFloat8_e4m3fn || kv_type == at::kFloat8_e4m3fnuz;
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == static_cast<int64_t>(L) &&
                  (kv_type == at::kBFloat16 || fp8) && v_cache.scalar_type() == kv_type &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous bfloat16 or fp8 e4m3 (layers, blocks, block_size, kv_heads, "
              "head_dim), got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(fp8 == (k_scale.has_value() && v_scale.has_value()), "an fp8 cache needs k_scale and v_scale, "
              "a bfloat16 cache none");
  if (fp8)
    for (const auto* sc : {&*k_scale, &*v_scale})
      TORCH_CHECK(sc->scalar_type() == at::kFloat && sc->is_contiguous() && sc->sizes() == k_cache.sizes().slice(0, 4),
                  "k_scale and v_scale must be contiguous float32 (layers, blocks, block_size, kv_heads), got ",
                  sc->sizes());
  TORCH_CHECK(!k_centre.has_value() || fp8, "k_centre is for an fp8 cache");
  if (k_centre.has_value())
    TORCH_CHECK(k_centre->scalar_type() == at::kFloat && k_centre->is_contiguous() && k_centre->dim() == 3 &&
                    k_centre->size(0) == k_cache.size(0) && k_centre->size(1) == k_cache.size(3) &&
                    k_centre->size(2) == k_cache.size(4),
                "k_centre must be contiguous float32 (layers, kv_heads, head_dim), got ", k_centre->sizes());
  TORCH_CHECK(k_cache.size(4) <= 512, "head_dim ", k_cache.size(4), " is above the 512 the step supports");
  Shape s;
  s.M = x_in.size(0);
  s.H = x_in.size(1);
  s.Hq = n_heads;
  s.Hkv = n_kv_heads;
  s.D = k_cache.size(4);
  s.blocks = k_cache.size(1);
  s.block_size = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == s.Hkv && s.Hq % s.Hkv == 0, "kv heads do not match the cache or the query heads");
  TORCH_CHECK(down_w[0].dim() == 2, "down projection must be 2-D");
  s.F = down_w[0].size(1);
  s.V = head.size(0);  // the packed head's rows: the vocabulary rounded up to 16; the caller drops the padding
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.size(0) == s.M &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int32 (M, width)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == s.M && positions.is_contiguous(),
              "positions must be contiguous int64 (M,)");
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.numel() == s.D / 2, "inv_freq must be float32 (D/2,)");
  s.table_width = block_tables.size(1);
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < s.M; ++m) {
    TORCH_CHECK(pos[m] >= 0 && pos[m] / s.block_size < s.table_width, "row ", m, ": position ", pos[m],
                " is beyond its block table of ", s.table_width, " blocks");
    for (int64_t b = 0; b <= pos[m] / s.block_size; ++b)
      TORCH_CHECK(tables[m * s.table_width + b] >= 0 && tables[m * s.table_width + b] < s.blocks, "row ", m,
                  ": block ", tables[m * s.table_width + b], " is outside the pool of ", s.blocks);
  }
  const int64_t q_size = s.Hq * s.D, kv_size = s.Hkv * s.D, qkv_width = q_size + 2 * kv_size;
  check_vector(norm, s.H, "final norm", L);
  check_weight(head, s.V, s.H, "lm_head", L);
  for (size_t l = 0; l < L; ++l) {
    check_weight(qkv_w[l], qkv_width, s.H, "qkv_proj", l);
    if (!qkv_b.empty()) check_vector(qkv_b[l], qkv_width, "qkv_proj bias", l);
    check_weight(o_w[l], s.H, q_size, "o_proj", l);
    check_weight(gate_up_w[l], 2 * s.F, s.H, "gate_up_proj", l);
    check_weight(down_w[l], s.H, s.F, "down_proj", l);
    check_vector(ln1[l], s.H, "input_layernorm", l);
    check_vector(ln2[l], s.H, "post_attention_layernorm", l);
  }
  const int threads = at::get_num_threads();
  const float epsf = static_cast<float>(eps);
  const int64_t M = s.M, H = s.H;

  // cos/sin per row, as the PyTorch path computes them: fp32 position * fp32 inverse frequency.
  std::vector<float> cos_(M * s.D / 2), sin_(M * s.D / 2);
  const float* inv = inv_freq.const_data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < s.D / 2; ++i) {
      const float a = static_cast<float>(pos[m]) * inv[i];
      cos_[m * s.D / 2 + i] = std::cos(a);
      sin_[m * s.D / 2 + i] = std::sin(a);
    }

  std::vector<bf16> x(x_in.const_data_ptr<bf16>(), x_in.const_data_ptr<bf16>() + M * H), h(M * H), qkv(M * qkv_width),
      attn(M * q_size), o(M * H), gu(M * 2 * s.F), act(M * s.F), d(M * H);
  const int64_t layer_elems = s.blocks * s.block_size * kv_size, layer_heads = s.blocks * s.block_size * s.Hkv;
  const Fp8Format format(kv_type == at::kFloat8_e4m3fnuz);
  PhaseClock clock;
  if (clock.on) ++g_profile_calls;
  for (size_t l = 0; l < L; ++l) {
    K::rms_norm_rows(x.data(), ln1[l].const_data_ptr<bf16>(), h.data(), M, H, epsf, threads);
    clock.mark(kNorm);
    K::gemm_packed(bits(h.data()), bits(qkv_w[l]), qkv.data(), M, H, qkv_width, qkv_width, threads);
    if (!qkv_b.empty()) {
      const bf16* b = qkv_b[l].const_data_ptr<bf16>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < qkv_width; ++i) qkv[m * qkv_width + i] = to_bf16(to_f(qkv[m * qkv_width + i]) + to_f(b[i]));
    }
    clock.mark(kQkv);
    KVStore k_layer, v_layer;
    if (fp8) {
      k_layer = {nullptr, static_cast<uint8_t*>(k_cache.data_ptr()) + l * layer_elems,
                 k_scale->data_ptr<float>() + l * layer_heads, format.lut.data()};
      v_layer = {nullptr, static_cast<uint8_t*>(v_cache.data_ptr()) + l * layer_elems,
                 v_scale->data_ptr<float>() + l * layer_heads, format.lut.data()};
    } else {
      k_layer.rows = k_cache.data_ptr<bf16>() + l * layer_elems;
      v_layer.rows = v_cache.data_ptr<bf16>() + l * layer_elems;
    }
    for (int64_t m = 0; m < M; ++m) {
      bf16* row = qkv.data() + m * qkv_width;
      rope_heads(row, s.Hq, s.D, cos_.data() + m * s.D / 2, sin_.data() + m * s.D / 2);
      rope_heads(row + q_size, s.Hkv, s.D, cos_.data() + m * s.D / 2, sin_.data() + m * s.D / 2);
      const int64_t slot =
          static_cast<int64_t>(tables[m * s.table_width + pos[m] / s.block_size]) * s.block_size + pos[m] % s.block_size;
      if (fp8) {
        const float* centre = k_centre.has_value() ? k_centre->const_data_ptr<float>() + l * kv_size : nullptr;
        for (int64_t h = 0; h < s.Hkv; ++h) {
          format.store(row + q_size + h * s.D, s.D, k_layer.bytes + slot * kv_size + h * s.D,
                       k_layer.scales + slot * s.Hkv + h, centre ? centre + h * s.D : nullptr);
          format.store(row + q_size + kv_size + h * s.D, s.D, v_layer.bytes + slot * kv_size + h * s.D,
                       v_layer.scales + slot * s.Hkv + h);
        }
      } else {
        std::copy(row + q_size, row + q_size + kv_size, k_layer.rows + slot * kv_size);
        std::copy(row + q_size + kv_size, row + qkv_width, v_layer.rows + slot * kv_size);
      }
    }
    clock.mark(kRopeCache);
    K::attend(qkv.data(), k_layer, v_layer, tables, pos, attn.data(), s, threads);
    clock.mark(kAttend);
    K::gemm_packed(bits(attn.data()), bits(o_w[l]), o.data(), M, q_size, H, H, threads);
    clock.mark(kOProj);
    K::add_rounded(x.data(), o.data(), M * H);
    clock.mark(kResidual);
    K::rms_norm_rows(x.data(), ln2[l].const_data_ptr<bf16>(), h.data(), M, H, epsf, threads);
    clock.mark(kNorm);
    K::gemm_packed(bits(h.data()), bits(gate_up_w[l]), gu.data(), M, H, 2 * s.F, 2 * s.F, threads);
    clock.mark(kGateUp);
    K::swiglu(gu.data(), act.data(), M, s.F, threads);
    clock.mark(kSwiglu);
    K::gemm_packed(bits(act.data()), bits(down_w[l]), d.data(), M, s.F, H, H, threads);
    clock.mark(kDown);
    K::add_rounded(x.data(), d.data(), M * H);
    clock.mark(kResidual);
  }
  // The head for the rows asked (a prefill wants each prompt's last row only): a row's
  // logits are the same bits whichever rows share the GEMM.
  int64_t R = M;
  std::vector<bf16> chosen;  // the rows asked, gathered
  if (logits_rows.has_value()) {
    TORCH_CHECK(logits_rows->scalar_type() == at::kLong && logits_rows->dim() == 1 && logits_rows->is_contiguous(),
                "logits_rows must be contiguous int64 (R,)");
    R = logits_rows->numel();
    const int64_t* sel = logits_rows->const_data_ptr<int64_t>();
    chosen.resize(R * H);
    for (int64_t r = 0; r < R; ++r) {
      TORCH_CHECK(sel[r] >= 0 && sel[r] < M, "logits_rows[", r, "] = ", sel[r], " is not a row of the ", M);
      std::copy(x.begin() + sel[r] * H, x.begin() + (sel[r] + 1) * H, chosen.begin() + r * H);
    }
  }
  const bf16* head_in = logits_rows.has_value() ? chosen.data() : x.data();
  if (R) K::rms_norm_rows(head_in, norm.const_data_ptr<bf16>(), h.data(), R, H, epsf, threads);
  clock.mark(kNorm);
  at::Tensor logits = at::empty({R, s.V}, x_in.options());
  if (R) K::gemm_packed(bits(h.data()), bits(head), logits.mutable_data_ptr<bf16>(), R, H, s.V, s.V, threads);
  at::Tensor out = logits.to(at::kFloat);
  clock.mark(kHead);
  return out;
}

// The eager path's RMSNorm and SwiGLU for bf16 rows on the CPU (prefill: hundreds
// to thousands of rows), with the fused step's kernels: PyTorch's reference casts
// to fp32 and back through several full-size temporaries.
template <class K>
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu<K>("rms_norm_bf16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && w.scalar_type() == at::kBFloat16 &&
                  w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "rms_norm_bf16 takes bfloat16 x (M, H) and a contiguous bfloat16 weight (H,), got ", x.sizes(), " and ",
              w.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  K::rms_norm_rows(xc.const_data_ptr<bf16>(), w.const_data_ptr<bf16>(), y.mutable_data_ptr<bf16>(), xc.size(0),
                xc.size(1), static_cast<float>(eps), at::get_num_threads());
  return y;
}

template <class K>
at::Tensor swiglu_bf16(const at::Tensor& gate_up) {
  check_cpu<K>("swiglu_bf16");
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "swiglu_bf16 takes bfloat16 gate_up (M, 2F), got ", gate_up.scalar_type(), " ", gate_up.sizes());
  const at::Tensor gu = gate_up.contiguous();
  const int64_t F = gu.size(1) / 2;
  at::Tensor act = at::empty({gu.size(0), F}, gu.options());
  K::swiglu(gu.const_data_ptr<bf16>(), act.mutable_data_ptr<bf16>(), gu.size(0), F, at::get_num_threads());
  return act;
}

// softmax over the last dimension of a float32 (rows, n) tensor with the step's
// own exp: exposed so that tests hold it to PyTorch's softmax.
template <class K>
at::Tensor softmax_f32(const at::Tensor& x) {
  check_cpu<K>("softmax_f32");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "softmax_f32 takes float32 (rows, n)");
  at::Tensor y = x.contiguous().clone();
  float* p = y.mutable_data_ptr<float>();
  const int64_t n = y.size(1);
  for (int64_t r = 0; r < y.size(0); ++r) {
    float* row = p + r * n;
    const float best = n ? *std::max_element(row, row + n) : 0.f;
    const float inv_total = 1.f / K::exp_shifted_sum(row, n, best);
    for (int64_t i = 0; i < n; ++i) row[i] *= inv_total;
  }
  return y;
}

inline void check_linear_inputs(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "wallperf::", op,
              " takes bfloat16 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "wallperf::", op, " takes contiguous tensors");
}

inline uint16_t* mutable_bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr<bf16>()); }

// weight (N, K) -> its panels (pack.h), shaped (N rounded up to 16, K rounded up to even).
template <class K>
at::Tensor pack_bf16(const at::Tensor& weight) {
  check_cpu<K>("pack_bf16");
  TORCH_CHECK(weight.dim() == 2, "wallperf::pack_bf16 takes weight (N, K), got ", weight.sizes());
  check_linear_inputs(weight, weight, "pack_bf16");
  const int64_t N = weight.size(0), Kw = weight.size(1);
  at::Tensor packed = at::empty({wallperf_pack::padded_n(N), wallperf_pack::padded_k(Kw)}, weight.options());
  K::pack(bits(weight), mutable_bits(packed), N, Kw);
  return packed;
}

// x (M, K) @ W^T with W (n, K) given as pack_bf16(W).
template <class K>
at::Tensor linear_packed_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  check_cpu<K>("linear_packed_bf16");
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && packed.size(0) == wallperf_pack::padded_n(n) &&
                  packed.size(1) == wallperf_pack::padded_k(x.size(1)),
              "wallperf::linear_packed_bf16 takes x (M, K) and pack_bf16 of a (", n, ", K) weight, got ", x.sizes(),
              " and ", packed.sizes());
  check_linear_inputs(x, packed, "linear_packed_bf16");
  const int64_t M = x.size(0), Kx = x.size(1), Kp = packed.size(1);
  // The packed K is even; an odd K's last pair needs a zero in x as well as in W.
  const at::Tensor xp = Kx == Kp ? x : at::constant_pad_nd(x, {0, Kp - Kx});
  at::Tensor y = at::empty({M, n}, x.options());
  K::gemm_packed(bits(xp), bits(packed), y.mutable_data_ptr<bf16>(), M, Kp, n, n, at::get_num_threads());
  return y;
}

// x (M, K) @ W^T for a row-major W (N, K): the GEMV up to K::kPackAbove rows of
// x, beyond that W packed for this call and the packed GEMM, which reuses each
// weight across all rows (prefill).
template <class K>
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight) {
  check_cpu<K>("linear_bf16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "wallperf::linear_bf16 takes x (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  check_linear_inputs(x, weight, "linear_bf16");
  const int64_t M = x.size(0), Kx = x.size(1), N = weight.size(0);
  if (M > K::kPackAbove) return linear_packed_bf16<K>(x, pack_bf16<K>(weight), N);
  at::Tensor y = at::empty({M, N}, x.options());
  K::gemv(bits(x), bits(weight), y.mutable_data_ptr<bf16>(), M, Kx, N, at::get_num_threads());
  return y;
}

// Switches the step's phase clock on or off and returns the seconds it summed
// per phase since the last reset (StepPhase order), then the number of steps
// timed; `reset` zeroes them.
inline at::Tensor step_profile(bool on, bool reset) {
  at::Tensor out = at::empty({kPhases + 1}, at::TensorOptions().dtype(at::kDouble));
  double* p = out.mutable_data_ptr<double>();
  for (int i = 0; i < kPhases; ++i) p[i] = g_profile_s[i];
  p[kPhases] = static_cast<double>(g_profile_calls);
  if (reset) {
    for (double& v : g_profile_s) v = 0.0;
    g_profile_calls = 0;
  }
  g_profile_on.store(on, std::memory_order_relaxed);
  return out;
}

}  // namespace wallperf_step

// The ops of kernel set K in the torch.ops namespace NS.
#define WALLPERF_REGISTER_CPU_OPS(NS, K)                                                                          \
  TORCH_LIBRARY(NS, m) {                                                                                        \
    m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");                                                   \
    m.def("pack_bf16(Tensor weight) -> Tensor");                                                               \
    m.def("linear_packed_bf16(Tensor x, Tensor packed, int n) -> Tensor");                                     \
    m.def("softmax_f32(Tensor x) -> Tensor");                                                                  \
    m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");                                           \
    m.def("swiglu_bf16(Tensor gate_up) -> Tensor");                                                            \
    m.def("step_profile(bool on, bool reset) -> Tensor", &wallperf_step::step_profile);                        \
    m.def(                                                                                                     \
        "llama_decode_bf16(Tensor x, Tensor[] qkv, Tensor[] qkv_bias, Tensor[] o, Tensor[] gate_up, "          \
        "Tensor[] down, Tensor[] ln1, Tensor[] ln2, Tensor norm, Tensor head, Tensor(a!) k_cache, "             \
        "Tensor(b!) v_cache, Tensor(c!)? k_scale, Tensor(d!)? v_scale, Tensor? k_centre, Tensor block_tables, " \
        "Tensor positions, Tensor inv_freq, int n_heads, int n_kv_heads, float eps, Tensor? logits_rows=None) "   \
        "-> Tensor");               \
  }                                                                                                            \
  TORCH_LIBRARY_IMPL(NS, CPU, m) {                                                                             \
    m.impl("linear_bf16", &wallperf_step::linear_bf16<K>);                                                     \
    m.impl("pack_bf16", &wallperf_step::pack_bf16<K>);                                                         \
    m.impl("linear_packed_bf16", &wallperf_step::linear_packed_bf16<K>);                                       \
    m.impl("softmax_f32", &wallperf_step::softmax_f32<K>);                                                     \
    m.impl("rms_norm_bf16", &wallperf_step::rms_norm_bf16<K>);                                                 \
    m.impl("swiglu_bf16", &wallperf_step::swiglu_bf16<K>);                                                     \
    m.impl("llama_decode_bf16", &wallperf_step::llama_decode_bf16<K>);                                         \
  }
