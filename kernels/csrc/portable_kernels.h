// The CPU micro-kernels written once over simd.h's Vec, for every instruction
// set without bf16 dot-product instructions (scalar, AVX2, AVX-512F, NEON):
// weights stay bf16 in memory (the bytes decode streams), are widened to fp32
// in registers, and every sum is fp32.
//
// Exactness: each output is one fp32 chain in a fixed order over K whatever
// else shares the call, so a row's result never depends on how many rows (or
// which other rows) are computed with it. Speculative verification and batched
// decode rely on that; tests/kernels check it bit for bit.
//
// - gemv: x (M, K) @ W^T with W row-major (N, K), for few rows (cpu_linear's
//   small M). R rows of W by up to kGemvRows rows of x per tile, W widened once
//   per tile for all rows of x, one vector accumulator per output, its lanes
//   summed at the end. W is streamed once whatever M, 8 KiB prefetched ahead.
// - gemm_packed: x (M, K) @ W^T with W packed once into panels of 16 output
//   columns (pack.h), each holding per pair of K the panel's columns'
//   (k, k+1) weights side by side. A 32-bit lane is one (lo, hi) pair: lo
//   widens by a shift, hi by a mask, each widened once per pair for a block of
//   kRowBlock rows of x, and each output lane accumulates over all of K with
//   two FMAs per pair against the broadcast x[m, k], x[m, k+1]: no horizontal
//   sums. A panel is read from L1/L2 once per row block and from DRAM once per
//   call; threads take contiguous ranges of panels.
//   On AVX2 (16 ymm) a block is 4 rows x 2 vectors: 8 accumulators, the
//   pair's 4 widened vectors, 2 broadcasts; 84-92 GFLOP/s a core at
//   SmolLM2's shapes on Zen 3, near its FMA rate. 2 rows x 4 vectors (32
//   columns) measured the same or 5-10% slower (twice the widening per FMA),
//   and blocks of 12 accumulators spill or reload their broadcasts (50-75).
// - row ops (RMSNorm, SwiGLU, residual add) rounding where PyTorch rounds.
// Nothing here needs PyTorch: tests/kernels/neon_driver.cpp runs these under
// qemu for the Arm build.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "pack.h"
#include "simd.h"

namespace wallperf_portable {
namespace {

using wallperf_simd::bf16_to_f32;
using wallperf_simd::f32_to_bf16;
using wallperf_simd::Vec;
using F = Vec::F;

constexpr int64_t kPanel = 16;           // packed output columns per panel
constexpr int kGroup = kPanel / Vec::N;  // vectors per panel
// Rows of x per register block: kRowBlock x kGroup accumulators, plus the
// pair's widened vectors and two broadcasts, within the register file.
constexpr int kRowBlock = Vec::N >= 16 ? 8 : 4;
constexpr int kGemvRows = 4;             // rows of x per GEMV tile
constexpr int kGemvW = 3;                // rows of W per GEMV tile
constexpr int64_t kPrefetchElems = 4096; // 8 KiB of bf16 ahead
constexpr int64_t kMinParallelWeights = 1 << 16;
constexpr int64_t kRowChunk = 64;        // rows of x per pass over the weights (x stays in L2)

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// [begin, end) of `n` items for this thread: equal contiguous ranges.
inline void my_range(int64_t n, int64_t& begin, int64_t& end) {
  const int64_t per = (n + thread_count() - 1) / thread_count();
  begin = std::min(n, thread_id() * per);
  end = std::min(n, begin + per);
}

inline F round_bf16(F v) {
  uint16_t t[Vec::N];
  Vec::narrow(t, v);
  return Vec::widen(t);
}

// x bf16 (M, K) -> fp32 (M, ldx), columns K..ldx zero.
inline void widen_rows(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, float* out) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) out[m * ldx + k] = bf16_to_f32(x[m * K + k]);
    for (int64_t k = K; k < ldx; ++k) out[m * ldx + k] = 0.f;
  }
}

// y[m, n + r] for r < R, m < MB: x fp32 rows (ldx apart), W rows from `w` (K apart).
template <int MB, int R>
void gemv_tile(const float* x, int64_t ldx, const uint16_t* w, int64_t K, uint16_t* y, int64_t ldy) {
  const int64_t kv = K / Vec::N * Vec::N;
  F acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = Vec::zero();
  for (int64_t k = 0; k < kv; k += Vec::N) {
    F wv[R];
    for (int r = 0; r < R; ++r) {
      wv[r] = Vec::widen(w + r * K + k);
      if (k % 32 == 0) Vec::prefetch(w + r * K + k + kPrefetchElems);
    }
    for (int m = 0; m < MB; ++m) {
      const F xv = Vec::load(x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = Vec::fma(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      float s = Vec::hsum(acc[m][r]);
      for (int64_t k = kv; k < K; ++k) s += x[m * ldx + k] * bf16_to_f32(w[r * K + k]);
      y[m * ldy + r] = f32_to_bf16(s);
    }
}

template <int R>
void gemv_rows(const float* x, int64_t M, const uint16_t* w, int64_t K, uint16_t* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + kGemvRows <= M; m += kGemvRows) gemv_tile<kGemvRows, R>(x + m * K, K, w, K, y + m * ldy, ldy);
  switch (M - m) {
    case 3: gemv_tile<3, R>(x + m * K, K, w, K, y + m * ldy, ldy); break;
    case 2: gemv_tile<2, R>(x + m * K, K, w, K, y + m * ldy, ldy); break;
    case 1: gemv_tile<1, R>(x + m * K, K, w, K, y + m * ldy, ldy); break;
    default: break;
  }
}

// y (M, N) bf16 = x (M, K) bf16 @ W (N, K)^T, W row-major.
inline void gemv(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t K, int64_t N, int threads) {
  std::vector<float> xf(M * K);
  widen_rows(x, M, K, K, xf.data());
  if (N * K < kMinParallelWeights) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    my_range(N, begin, end);
    int64_t n = begin;
    for (; n + kGemvW <= end; n += kGemvW) gemv_rows<kGemvW>(xf.data(), M, w + n * K, K, y + n, N);
    for (; n < end; ++n) gemv_rows<1>(xf.data(), M, w + n * K, K, y + n, N);
  }
}

// Rows [0, MB) of x (fp32, ldx apart, K2 pairs) times one panel of NV vectors;
// writes bf16 columns [n0, n0 + NV * Vec::N) of y, clipped at N. Each pair of K
// also prefetches pf_bytes from pf onwards (a share of the next panel).
template <int MB, int NV>
void panel_block(const float* x, int64_t ldx, const uint16_t* panel, int64_t K2, uint16_t* y, int64_t ldy,
                 int64_t n0, int64_t N, const char* pf, int64_t pf_bytes) {
  F acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int g = 0; g < NV; ++g) acc[m][g] = Vec::zero();
  for (int64_t kp = 0; kp < K2; ++kp) {
    const uint16_t* wp = panel + kp * 2 * NV * Vec::N;
    for (int64_t b = 0; b < pf_bytes; b += 64) Vec::prefetch(pf + kp * pf_bytes + b);
    const float* xk = x + 2 * kp;
    F lo[NV], hi[NV];
    for (int g = 0; g < NV; ++g) Vec::pairs(wp + g * 2 * Vec::N, lo[g], hi[g]);
    // Each broadcast serves the whole panel width before the next row's.
    for (int m = 0; m < MB; ++m) {
      const F x0 = Vec::set1(xk[m * ldx]), x1 = Vec::set1(xk[m * ldx + 1]);
      for (int g = 0; g < NV; ++g) acc[m][g] = Vec::fma(x1, hi[g], Vec::fma(x0, lo[g], acc[m][g]));
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int g = 0; g < NV; ++g) {
      const int64_t n = n0 + g * Vec::N;
      if (n + Vec::N <= N) {
        Vec::narrow(y + m * ldy + n, acc[m][g]);
      } else if (n < N) {
        uint16_t t[Vec::N];
        Vec::narrow(t, acc[m][g]);
        std::copy(t, t + (N - n), y + m * ldy + n);
      }
    }
}

using PanelBlock = void (*)(const float*, int64_t, const uint16_t*, int64_t, uint16_t*, int64_t, int64_t, int64_t,
                            const char*, int64_t);

template <int NV, int MB = kRowBlock>
PanelBlock panel_block_up_to(int rows) {
  if constexpr (MB == 1) {
    return panel_block<1, NV>;
  } else {
    return rows == MB ? panel_block<MB, NV> : panel_block_up_to<NV, MB - 1>(rows);
  }
}

// A panel of `vectors` vectors (the last panel may be narrower than kPanel:
// pack.h pads N to 16 columns only).
template <int NV = kGroup>
PanelBlock panel_block_for(int rows, int64_t vectors) {
  if constexpr (NV == 1) {
    return panel_block_up_to<1>(rows);
  } else {
    return vectors >= NV ? panel_block_up_to<NV>(rows) : panel_block_for<NV - 1>(rows, vectors);
  }
}

// y (M, N), leading dimension ldy = x (M, K) bf16 @ W^T, W packed by pack_panels
// (panel width kPanel) from (N, K); Kp = padded_k(K) columns of the packing.
inline void gemm_packed(const uint16_t* x, int64_t K, const uint16_t* packed, uint16_t* y, int64_t M, int64_t Kp,
                        int64_t N, int64_t ldy, int threads) {
  std::vector<float> xf(M * Kp);
  widen_rows(x, M, K, Kp, xf.data());
  const int64_t Np = wallperf_pack::padded_n(N), K2 = Kp / 2, panels = (Np + kPanel - 1) / kPanel;
  if (Np * Kp < kMinParallelWeights) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int64_t begin, end;
    my_range(panels, begin, end);
    for (int64_t c0 = 0; c0 < M; c0 += kRowChunk) {
      const int64_t rows_here = std::min(kRowChunk, M - c0);
      const int64_t blocks = (rows_here + kRowBlock - 1) / kRowBlock;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kPanel, vectors = std::min(kPanel, Np - n0) / Vec::N;
        const uint16_t* panel = packed + n0 * Kp;
        // The next panel of this thread's range, a share of it per row block,
        // so that DRAM streams under the math of this one (the hardware
        // prefetchers alone left each GEMM's start, and the few row blocks of
        // a small batch, waiting on memory).
        const int64_t next_bytes = p + 1 < end ? std::min(kPanel, Np - n0 - kPanel) * Kp * 2 : 0;
        const int64_t share = (next_bytes + blocks - 1) / blocks, pf_bytes = (share + K2 - 1) / K2;
        const char* next = reinterpret_cast<const char*>(panel + vectors * Vec::N * Kp);
        for (int64_t b = 0, m0 = c0; b < blocks; ++b) {
          // near-equal blocks, the larger first, so no block is left with one row
          const int64_t left = c0 + rows_here - m0;
          const int64_t rows = left / (blocks - b) + (left % (blocks - b) ? 1 : 0);
          panel_block_for(static_cast<int>(rows), vectors)(xf.data() + m0 * Kp, Kp, panel, K2, y + m0 * ldy, ldy,
                                                           n0, N, next + b * share, c0 == 0 ? pf_bytes : 0);
          m0 += rows;
        }
      }
    }
  }
}

// x = bf16(x + y) elementwise over n: the residual add.
inline void add_rounded(uint16_t* x, const uint16_t* y, int64_t n) {
  int64_t i = 0;
  for (; i + Vec::N <= n; i += Vec::N) Vec::narrow(x + i, Vec::add(Vec::widen(x + i), Vec::widen(y + i)));
  for (; i < n; ++i) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(y[i]));
}

inline float silu_times(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// act[m] = bf16(silu(gate) * up) for each row's gate_up = [gate | up] (F each).
inline void swiglu(const uint16_t* gu, uint16_t* act, int64_t M, int64_t F_, int threads) {
#pragma omp parallel for num_threads(M > 1 ? threads : 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* g = gu + m * 2 * F_;
    const uint16_t* u = g + F_;
    uint16_t* a = act + m * F_;
    int64_t i = 0;
    for (; i + Vec::N <= F_; i += Vec::N) {
      const F gv = Vec::widen(g + i);
      const F silu = Vec::div(gv, Vec::add(Vec::set1(1.f), wallperf_simd::exp(Vec::sub(Vec::zero(), gv))));
      Vec::narrow(a + i, Vec::mul(silu, Vec::widen(u + i)));
    }
    for (; i < F_; ++i) a[i] = f32_to_bf16(silu_times(bf16_to_f32(g[i]), bf16_to_f32(u[i])));
  }
}

// RMSNorm of M rows: y = bf16(w * bf16(x * r)), r = 1 / sqrt(mean(x^2) + eps) in fp32.
inline void rms_norm_rows(const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t M, int64_t H, float eps,
                          int threads) {
#pragma omp parallel for num_threads(M > 1 ? threads : 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* xr = x + m * H;
    // Blocks of kSumBlock squares in fp32 lanes, their sums added in double: one
    // long fp32 chain (the scalar path's) drifts far enough from PyTorch's
    // cascaded sum to flip the rounding of x * r.
    constexpr int64_t kSumBlock = 64;
    double sum = 0.0;
    int64_t i = 0;
    while (i + Vec::N <= H) {
      F ss = Vec::zero();
      for (const int64_t stop = std::min(H, i + kSumBlock); i + Vec::N <= stop; i += Vec::N) {
        const F v = Vec::widen(xr + i);
        ss = Vec::fma(v, v, ss);
      }
      sum += Vec::hsum(ss);
    }
    for (int64_t j = i; j < H; ++j) sum += bf16_to_f32(xr[j]) * bf16_to_f32(xr[j]);
    const float r = 1.f / std::sqrt(static_cast<float>(sum) / static_cast<float>(H) + eps);
    uint16_t* yr = y + m * H;
    for (i = 0; i + Vec::N <= H; i += Vec::N)
      Vec::narrow(yr + i, Vec::mul(Vec::widen(w + i), round_bf16(Vec::mul(Vec::widen(xr + i), Vec::set1(r)))));
    for (; i < H; ++i)
      yr[i] = f32_to_bf16(bf16_to_f32(w[i]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * r)));
  }
}

// scores[0..n) = exp(scores - best) in place; returns their sum.
inline float exp_shifted_sum(float* scores, int64_t n, float best) {
  F sum = Vec::zero();
  const F b = Vec::set1(best);
  int64_t t = 0;
  for (; t + Vec::N <= n; t += Vec::N) {
    const F e = wallperf_simd::exp(Vec::sub(Vec::load(scores + t), b));
    Vec::store(scores + t, e);
    sum = Vec::add(sum, e);
  }
  float total = Vec::hsum(sum);
  for (; t < n; ++t) {
    scores[t] = std::exp(scores[t] - best);
    total += scores[t];
  }
  return total;
}

// sum over d of q[d] * k[d]: q fp32, k bf16 (D values).
inline float dot_bf16(const float* q, const uint16_t* k, int64_t D) {
  F acc = Vec::zero();
  int64_t d = 0;
  for (; d + Vec::N <= D; d += Vec::N) acc = Vec::fma(Vec::load(q + d), Vec::widen(k + d), acc);
  float s = Vec::hsum(acc);
  for (; d < D; ++d) s += q[d] * bf16_to_f32(k[d]);
  return s;
}

inline float dot_f32(const float* q, const float* k, int64_t D) {
  F acc = Vec::zero();
  int64_t d = 0;
  for (; d + Vec::N <= D; d += Vec::N) acc = Vec::fma(Vec::load(q + d), Vec::load(k + d), acc);
  float s = Vec::hsum(acc);
  for (; d < D; ++d) s += q[d] * k[d];
  return s;
}

// acc[d] += p * v[d] for D values, v bf16 or fp32.
inline void axpy_bf16(float p, const uint16_t* v, float* acc, int64_t D) {
  const F pv = Vec::set1(p);
  int64_t d = 0;
  for (; d + Vec::N <= D; d += Vec::N) Vec::store(acc + d, Vec::fma(pv, Vec::widen(v + d), Vec::load(acc + d)));
  for (; d < D; ++d) acc[d] += p * bf16_to_f32(v[d]);
}

inline void axpy_f32(float p, const float* v, float* acc, int64_t D) {
  const F pv = Vec::set1(p);
  int64_t d = 0;
  for (; d + Vec::N <= D; d += Vec::N) Vec::store(acc + d, Vec::fma(pv, Vec::load(v + d), Vec::load(acc + d)));
  for (; d < D; ++d) acc[d] += p * v[d];
}

}  // namespace
}  // namespace wallperf_portable
