// GEMV building blocks shared by the CPU ops: y = x @ W^T for decode batch sizes.
//
// At batch 1 every weight is read once for two FLOPs, so the kernel's job is to
// keep DRAM busy. Measured on a 2-core Zen 4 (harness/bench_gemv.py and variants
// of this file, each against the others in one process):
// - Rows of W are taken one at a time, front to back, so each thread reads its
//   share of W as one sequential stream. Without software prefetch, blocking 4
//   or 8 rows (as many short streams 1-3 KiB apart) was ~40% slower; with it,
//   blocking neither helps nor hurts, so the simpler loop stays.
// - PREFETCHT1 8 KiB ahead of each load: on Zen 4 it fills L2 (T0 fills L1),
//   which has more misses in flight than L1, and unlike the hardware
//   prefetchers it runs on across 4 KiB page boundaries. At batch 1 it gained
//   0-12% (the machine's state varied between runs), at batch 4-8 20-60%.
//   T0 or NTA at the same distance, or T1 at 2-4 KiB, gained less.
// - One load of W feeds the dot products of up to kMaxBatch inputs; larger M
//   runs in passes of kMaxBatch, reading W again each pass.
// - _mm512_dpbf16_ps multiplies 32 bf16 pairs and adds them into 16 fp32
//   lanes; two accumulators per input over alternate chunks of K halve the
//   dependency chain (not the bottleneck here: the DRAM stream is).
// - Threads take equal contiguous ranges of rows (static), one stream each.
//
// Only the functions marked AVX512_BF16 use those instructions, so the library
// loads on any x86-64 CPU; the op checks the CPU before running them.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace wallperf_gemv {

#define AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

constexpr int64_t kChunk = 32;  // bf16 elements in one 512-bit vector: one cache line of W
constexpr int kAccumulators = 2;
constexpr int64_t kMaxBatch = 8;
constexpr int64_t kPrefetchBytes = 8192;
// Below this many weights (128 KiB) one thread is as fast as two: waking the
// second costs what it saves (measured: ~9 us per call either way at 64 Ki).
constexpr int64_t kMinParallelWeights = 1 << 16;

AVX512_BF16 inline __m512bh load_bf16(const uint16_t* p) {
  return (__m512bh)_mm512_loadu_si512(p);
}

// Past the end of W this touches memory we do not own: harmless, a prefetch never faults.
AVX512_BF16 inline void prefetch_to_l2(const uint16_t* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1);
}

// Zero beyond the mask, so a partial chunk at the end of K adds nothing.
AVX512_BF16 inline __m512bh load_bf16_masked(const uint16_t* p, __mmask32 mask) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// y[m, n] for rows n in [n_begin, n_end) of W and all M inputs; x is (M, K), y is (M, ldy).
template <int M>
AVX512_BF16 void gemv_rows(const uint16_t* x, const uint16_t* w, at::BFloat16* y, int64_t K, int64_t ldy,
                           int64_t n_begin, int64_t n_end) {
  constexpr int64_t kStep = kChunk * kAccumulators;
  const int64_t k_unrolled = K / kStep * kStep;
  const int64_t k_full = K / kChunk * kChunk;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k_full)) - 1);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint16_t* row = w + n * K;
    __m512 acc[kAccumulators][M];
    for (int a = 0; a < kAccumulators; ++a)
      for (int m = 0; m < M; ++m) acc[a][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < k_unrolled; k += kStep) {
      for (int a = 0; a < kAccumulators; ++a) {
        const int64_t ka = k + a * kChunk;
        const __m512bh wv = load_bf16(row + ka);
        prefetch_to_l2(row + ka);
        for (int m = 0; m < M; ++m) acc[a][m] = _mm512_dpbf16_ps(acc[a][m], load_bf16(x + m * K + ka), wv);
      }
    }
    for (; k < k_full; k += kChunk) {
      const __m512bh wv = load_bf16(row + k);
      prefetch_to_l2(row + k);
      for (int m = 0; m < M; ++m) acc[0][m] = _mm512_dpbf16_ps(acc[0][m], load_bf16(x + m * K + k), wv);
    }
    if (tail) {
      const __m512bh wv = load_bf16_masked(row + k_full, tail);
      for (int m = 0; m < M; ++m)
        acc[0][m] = _mm512_dpbf16_ps(acc[0][m], load_bf16_masked(x + m * K + k_full, tail), wv);
    }
    for (int m = 0; m < M; ++m) {
      __m512 sum = acc[0][m];
      for (int a = 1; a < kAccumulators; ++a) sum = _mm512_add_ps(sum, acc[a][m]);
      y[m * ldy + n] = at::BFloat16(_mm512_reduce_add_ps(sum));  // rounds to nearest even
    }
  }
}

// The same for M >= 2, R rows of W at a time: each load of x feeds R dot
// products and each load of W feeds M, so a chunk of K costs R + M loads for
// R * M dpbf16 instead of M + 1 loads for M. From 2 rows of x on, the loop is
// bound by load slots, dpbf16 throughput and the horizontal sums at the end of
// each row (K is only 576 here) rather than DRAM: SmolLM2's fused decode step
// (2-core Zen 4) went from 438 to 480 tok/s at 8 rows and 430 to 531 at 32.
template <int M, int R>
AVX512_BF16 void gemv_rows_tiled(const uint16_t* x, const uint16_t* w, at::BFloat16* y, int64_t K, int64_t ldy,
                                 int64_t n_begin, int64_t n_end) {
  const int64_t k_full = K / kChunk * kChunk;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (K - k_full)) - 1);
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) {
    const uint16_t* rows = w + n * K;
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_full; k += kChunk) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = load_bf16(rows + r * K + k);
        prefetch_to_l2(rows + r * K + k);
      }
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = load_bf16(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
      }
    }
    if (tail) {
      for (int m = 0; m < M; ++m) {
        const __m512bh xv = load_bf16_masked(x + m * K + k_full, tail);
        for (int r = 0; r < R; ++r)
          acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, load_bf16_masked(rows + r * K + k_full, tail));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * ldy + n + r] = at::BFloat16(_mm512_reduce_add_ps(acc[r][m]));
  }
  if (n < n_end) gemv_rows<M>(x, w, y, K, ldy, n, n_end);
}

using GemvRows = void (*)(const uint16_t*, const uint16_t*, at::BFloat16*, int64_t, int64_t, int64_t, int64_t);

// The batch is a template argument so that the accumulators live in registers.
inline GemvRows gemv_rows_for_batch(int64_t m) {
  switch (m) {
    // R * M accumulators + R weight vectors + one x vector within the 32 zmm registers.
    case 1: return gemv_rows<1>;
    case 2: return gemv_rows_tiled<2, 4>;
    case 3: return gemv_rows_tiled<3, 4>;
    case 4: return gemv_rows_tiled<4, 4>;
    case 5: return gemv_rows_tiled<5, 3>;
    case 6: return gemv_rows_tiled<6, 3>;
    case 7: return gemv_rows_tiled<7, 3>;
    default: return gemv_rows_tiled<8, 3>;
  }
}

inline bool cpu_has_avx512_bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

// y (M, N) = x (M, K) @ W (N, K)^T over `threads` OpenMP threads, each a contiguous range of rows of W.
inline void gemv(const uint16_t* xp, const uint16_t* wp, at::BFloat16* yp, int64_t M, int64_t K, int64_t N,
                 int threads) {
  if (N * K < kMinParallelWeights) threads = 1;
  for (int64_t m0 = 0; m0 < M; m0 += kMaxBatch) {
    const GemvRows rows = gemv_rows_for_batch(std::min(kMaxBatch, M - m0));
#pragma omp parallel num_threads(threads)
    {
      const int64_t per_thread = (N + omp_get_num_threads() - 1) / omp_get_num_threads();
      const int64_t begin = std::min(N, omp_get_thread_num() * per_thread);
      const int64_t end = std::min(N, begin + per_thread);
      rows(xp + m0 * K, wp, yp + m0 * N, K, N, begin, end);
    }
  }
}

}  // namespace wallperf_gemv
