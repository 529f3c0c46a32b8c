// y = x @ W^T for 1-64 (or more) rows of x against a pre-packed bf16 W: the
// decode step's GEMM, which reuses every loaded weight across all rows.
//
// gemv_bf16.h reads W row-major and ends every (row of x, row of W) dot
// product with a horizontal sum; from 2 rows on it is bound by load slots and
// those sums, and it reads W once per 8 rows of x. Here W is packed once
// (pack_panels) so that the kernel needs no horizontal sum at all:
// - Panels of kPanel (48) output columns; within a panel, for each pair of K
//   (k, k+1), the 48 columns' two weights side by side: three 512-bit vectors
//   whose 32-bit lanes are the (W[n, k], W[n, k+1]) pairs _mm512_dpbf16_ps
//   multiplies with a broadcast (x[m, k], x[m, k+1]) pair. Each lane
//   accumulates one output in fp32 over all of K, as a GEMM's C tile does.
// - Register blocking: up to kRowBlock (8) rows of x times the panel's three
//   vectors: 24 fp32 accumulators, 3 weight vectors and one broadcast in the
//   32 zmm registers; per pair of K, 3 vector loads and 8 broadcast loads
//   feed 24 dpbf16. Zen 4 issues one 512-bit dpbf16 per cycle per core, so
//   the loop is bound by the multiplier, not by loads.
// - A thread takes a contiguous range of panels (OpenMP, static) and runs all
//   row blocks of x over one panel before the next: the panel (K * 96 bytes,
//   55 KiB at K = 576) comes from DRAM once and from L2 for the other row
//   blocks. While it computes on one panel it prefetches the next into L2,
//   spread over every row block's K loop, so DRAM streams under the math.
// - 48 columns: SmolLM2's widths (576, 960, 3072, 49152) are whole numbers of
//   panels split evenly over 2 threads; 64 left 576 as 5 + 4 panels.
// - Rows are cut into near-equal blocks of at most 8 (33 rows: 7,7,7,6,6), so
//   no block is left with one row that would be bound by weight loads.
// The packing (pack.h) is shared with the other instruction sets' kernels;
// here its panels are 48 columns wide.
#pragma once
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "gemv_bf16.h"
#include "pack.h"

namespace wallperf_gemm {

using wallperf_gemv::load_bf16;

constexpr int kLanes = 16;     // fp32 outputs in one zmm accumulator
constexpr int kPanelVecs = 3;  // zmm of output columns per panel
constexpr int64_t kPanel = kLanes * kPanelVecs;
constexpr int kRowBlock = 8;

using wallperf_pack::padded_k;
using wallperf_pack::padded_n;

inline void pack_panels(const uint16_t* w, uint16_t* packed, int64_t N, int64_t K) {
  wallperf_pack::pack_panels(w, packed, N, K, kPanel);
}

// Rows [0, MB) of x (leading dimension ldx, K padded to even) times one panel
// of NB vectors; writes bf16 columns [n0, n0 + 16 * NB) of y, clipped at N.
// Each pair of K also prefetches pf_bytes from pf onwards (the next panel).
template <int MB, int NB>
AVX512_BF16 void panel_block(const uint16_t* x, int64_t ldx, const uint16_t* panel, int64_t K2,
                             at::BFloat16* y, int64_t ldy, int64_t n0, int64_t N, const char* pf,
                             int64_t pf_bytes) {
  __m512 acc[MB][NB];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NB; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    const uint16_t* wp = panel + kp * NB * 2 * kLanes;
    __m512bh w[NB];
    for (int v = 0; v < NB; ++v) w[v] = load_bf16(wp + v * 2 * kLanes);
    for (int64_t b = 0; b < pf_bytes; b += 64) _mm_prefetch(pf + kp * pf_bytes + b, _MM_HINT_T1);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;
      std::memcpy(&pair, x + m * ldx + 2 * kp, sizeof pair);
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NB; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xv, w[v]);
    }
  }
  for (int v = 0; v < NB; ++v) {
    const int64_t n = n0 + v * kLanes;
    const __mmask16 mask = n + kLanes <= N ? __mmask16(0xFFFF) : __mmask16((1u << std::max<int64_t>(0, N - n)) - 1);
    for (int m = 0; m < MB; ++m) {
      const __m256i out = (__m256i)_mm512_cvtneps_pbh(acc[m][v]);  // rounds to nearest even
      _mm256_mask_storeu_epi16(y + m * ldy + n, mask, out);
    }
  }
}

using PanelBlock = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, at::BFloat16*, int64_t, int64_t,
                            int64_t, const char*, int64_t);

template <int NB>
PanelBlock panel_block_for(int mb) {
  switch (mb) {
    case 1: return panel_block<1, NB>;
    case 2: return panel_block<2, NB>;
    case 3: return panel_block<3, NB>;
    case 4: return panel_block<4, NB>;
    case 5: return panel_block<5, NB>;
    case 6: return panel_block<6, NB>;
    case 7: return panel_block<7, NB>;
    default: return panel_block<8, NB>;
  }
}

inline PanelBlock panel_block_for(int mb, int nb) {
  switch (nb) {
    case 1: return panel_block_for<1>(mb);
    case 2: return panel_block_for<2>(mb);
    default: return panel_block_for<3>(mb);
  }
}

// y (M, N), leading dimension ldy = x (M, Kp) @ W^T, W packed by pack_panels
// from (N, K) with Kp = padded_k(K); x's columns past K must be zero.
inline void gemm_packed(const uint16_t* x, const uint16_t* packed, at::BFloat16* y, int64_t M, int64_t Kp, int64_t N,
                        int64_t ldy, int threads) {
  const int64_t Np = padded_n(N), K2 = Kp / 2, panels = (Np + kPanel - 1) / kPanel;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  if (Np * Kp < wallperf_gemv::kMinParallelWeights) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    const int64_t per_thread = (panels + omp_get_num_threads() - 1) / omp_get_num_threads();
    const int64_t begin = std::min(panels, omp_get_thread_num() * per_thread);
    const int64_t end = std::min(panels, begin + per_thread);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, Np - n0);
      const uint16_t* panel = packed + n0 * Kp;
      // The next panel of this thread's range, a share of it per row block.
      const int64_t next_bytes = p + 1 < end ? std::min(kPanel, Np - n0 - kPanel) * Kp * 2 : 0;
      const int64_t share = (next_bytes + blocks - 1) / blocks;
      const int64_t pf_bytes = (share + K2 - 1) / K2;
      const char* next = reinterpret_cast<const char*>(panel + width * Kp);
      for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
        const int64_t mb = (M - m0) / (blocks - b);  // near-equal blocks, the larger first
        const int64_t rows = mb + ((M - m0) % (blocks - b) ? 1 : 0);
        panel_block_for(static_cast<int>(rows), static_cast<int>(width / kLanes))(
            x + m0 * Kp, Kp, panel, K2, y + m0 * ldy, ldy, n0, N, next + b * share, pf_bytes);
        m0 += rows;
      }
    }
  }
}

}  // namespace wallperf_gemm
