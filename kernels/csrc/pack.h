// Weights packed once into panels of output columns for the GEMMs of the fused
// decode step: panel p covers columns [p * panel, p * panel + width); its data
// starts at p * panel * Kp and holds, for each pair kp of K, the width
// columns' (W[n, 2kp], W[n, 2kp + 1]) pairs side by side. A 32-bit lane is then
// one pair, which VDPBF16PS multiplies directly (gemm_bf16.h, 48-column panels)
// and the other instruction sets widen with a shift and a mask
// (portable_kernels.h, 16-column panels). Packed size: N rounded up to 16 by K
// rounded up to even, zero padded; the padding multiplies zeros, so an odd K
// needs x padded with a zero column too.
#pragma once
#include <algorithm>
#include <cstdint>

namespace wallperf_pack {

constexpr int64_t kLanes = 16;

inline int64_t padded_n(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }
inline int64_t padded_k(int64_t k) { return (k + 1) / 2 * 2; }

inline void pack_panels(const uint16_t* w, uint16_t* packed, int64_t N, int64_t K, int64_t panel_width) {
  const int64_t Np = padded_n(N), Kp = padded_k(K);
#pragma omp parallel for schedule(static)
  for (int64_t p0 = 0; p0 < Np; p0 += panel_width) {
    const int64_t width = std::min(panel_width, Np - p0);
    uint16_t* panel = packed + p0 * Kp;
    for (int64_t kp = 0; kp < Kp / 2; ++kp)
      for (int64_t c = 0; c < width; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t n = p0 + c, k = 2 * kp + e;
          panel[(kp * width + c) * 2 + e] = (n < N && k < K) ? w[n * K + k] : 0;
        }
  }
}

}  // namespace wallperf_pack
