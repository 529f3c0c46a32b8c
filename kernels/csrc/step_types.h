// The pieces of the fused decode step shared by every instruction set's
// kernels: the step's shape, one layer's K or V store in the engine's paged
// pool, and the fp8 cache format.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e4m3fnuz.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace wallperf_step {

using bf16 = at::BFloat16;

inline float to_f(bf16 v) { return static_cast<float>(v); }
inline bf16 to_bf16(float v) { return bf16(v); }  // round to nearest even

// One layer's K or V store: bf16 rows, or fp8 bytes with a scale per (slot, KV head).
struct KVStore {
  bf16* rows = nullptr;
  uint8_t* bytes = nullptr;
  float* scales = nullptr;
  const float* lut = nullptr;
};

// The fp8 formats' largest finite value and byte -> float table, and the cast.
struct Fp8Format {
  bool fnuz = false;
  float max = 0.f;
  std::vector<float> lut;

  explicit Fp8Format(bool fnuz_) : fnuz(fnuz_), max(fnuz_ ? 240.f : 448.f), lut(256) {
    for (int b = 0; b < 256; ++b)
      lut[b] = fnuz ? static_cast<float>(c10::Float8_e4m3fnuz(static_cast<uint8_t>(b), c10::Float8_e4m3fnuz::from_bits()))
                    : static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
  }

  // As sut.quant.quantize_kv_vectors: y = x - centre in fp32 (no centre: y = x),
  // scale = amax(y) / max (1 for a zero vector), then clamp(y / scale) cast to fp8.
  void store(const bf16* x, int64_t D, uint8_t* out, float* scale, const float* centre = nullptr) const {
    float y[512];
    for (int64_t i = 0; i < D; ++i) y[i] = centre ? to_f(x[i]) - centre[i] : to_f(x[i]);
    float amax = 0.f;
    for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(y[i]));
    const float s = amax > 0.f ? amax / max : 1.f;
    for (int64_t i = 0; i < D; ++i) {
      const float v = std::min(std::max(y[i] / s, -max), max);
      out[i] = fnuz ? c10::Float8_e4m3fnuz(v).x : c10::Float8_e4m3fn(v).x;
    }
    *scale = s;
  }
};

struct Shape {
  int64_t M, H, Hq, Hkv, D, F, V, blocks, block_size, table_width;
};

}  // namespace wallperf_step
