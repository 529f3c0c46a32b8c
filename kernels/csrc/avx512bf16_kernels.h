// The AVX512-BF16 micro-kernels of the fused decode step besides its GEMMs
// (gemm_bf16.h): row ops and paged attention on 512-bit vectors with
// VDPBF16PS. Only these functions use those instructions (target attributes),
// so the library that holds them loads on any x86-64 CPU; the ops check the
// CPU before running them.
#pragma once
#include <limits>
#include <vector>

#include "gemm_bf16.h"
#include "step_types.h"

namespace wallperf_avx512bf16 {

using namespace wallperf_gemv;
using namespace wallperf_step;

// e^x, 16 lanes: 2^(x log2 e) split into an integer n and f in [-0.5, 0.5]; 2^f
// by its Taylor series to degree 6 (relative error < 1e-6), scaled by 2^n.
// Below -87 it returns ~0, as expf does; past ~88 it is inf, as expf is.
AVX512_BF16 inline __m512 exp_ps(__m512 x) {
  // ln(2)^k / k!
  constexpr float c1 = 0.6931471805599453f, c2 = 0.2402265069591007f, c3 = 0.05550410866482158f,
                  c4 = 0.009618129107628477f, c5 = 0.0013333558146428443f, c6 = 0.00015403530393381608f;
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(c6);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c5));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c4));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c3));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c2));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c1));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values (masked) widened to fp32, and fp32 rounded to nearest even into bf16 (masked).
AVX512_BF16 inline __m512 load_f32(const bf16* p, __mmask16 mask) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
AVX512_BF16 inline void store_bf16(bf16* p, __m512 v, __mmask16 mask) {
  _mm256_mask_storeu_epi16(p, mask, (__m256i)_mm512_cvtneps_pbh(v));
}
// fp32 lanes rounded to the nearest bf16 (even on ties), kept as fp32.
AVX512_BF16 inline __m512 round_bf16(__m512 v) {
  const __m512i w = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
inline __mmask16 mask_to(int64_t i, int64_t n) {
  return n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
}

// x = bf16(x + y), elementwise over n: the residual add.
AVX512_BF16 void add_rounded(bf16* x, const bf16* y, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = mask_to(i, n);
    store_bf16(x + i, _mm512_add_ps(load_f32(x + i, mask), load_f32(y + i, mask)), mask);
  }
}

// act[m] = bf16(silu(gate) * up) in fp32 for each row's gate_up = [gate | up]
// (F each), rows over the threads: scalar expf here cost ~10% of a 32-row step.
AVX512_BF16 void swiglu(const bf16* gu, bf16* act, int64_t M, int64_t F, int threads) {
#pragma omp parallel for num_threads(M > 1 ? threads : 1) schedule(static)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < F; i += 16) {
      const __mmask16 mask = mask_to(i, F);
      const __m512 g = load_f32(gu + m * 2 * F + i, mask), u = load_f32(gu + m * 2 * F + F + i, mask);
      const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      store_bf16(act + m * F + i, _mm512_mul_ps(silu, u), mask);
    }
}

// RMSNorm of M rows (the step's and, through rms_norm_bf16, prefill's): rows over
// the threads, each row's sum of squares in 16 fp32 lanes; y = bf16(w * bf16(x * r))
// as the PyTorch path rounds.
AVX512_BF16 void rms_norm_rows(const bf16* x, const bf16* w, bf16* y, int64_t M, int64_t H, float eps,
                               int threads) {
#pragma omp parallel for num_threads(M > 1 ? threads : 1) schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const bf16* xr = x + m * H;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < H; i += 16) {
      const __m512 v = load_f32(xr + i, mask_to(i, H));
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps));
    for (int64_t i = 0; i < H; i += 16) {
      const __mmask16 mask = mask_to(i, H);
      // bf16(x * r) first, then the weight's product rounded again.
      const __m512 normed = round_bf16(_mm512_mul_ps(load_f32(xr + i, mask), r));
      store_bf16(y + m * H + i, _mm512_mul_ps(load_f32(w + i, mask), normed), mask);
    }
  }
}

// scores[0..n) = exp(scores - best) in place; returns their sum.
AVX512_BF16 float exp_shifted_sum(float* scores, int64_t n, float best) {
  const __m512 b = _mm512_set1_ps(best);
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + t), b));
    _mm512_storeu_ps(scores + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + t), b));
    _mm512_mask_storeu_ps(scores + t, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// Attention works on tiles of 16 positions of one KV head. Scores: each key's
// dot product with a query head by VDPBF16PS (bf16 pairs, exact products, fp32
// sums) into one accumulator per key, the 16 accumulators summed across their
// lanes together (sum16) instead of one horizontal sum per key, and the tile's
// keys reused by every query head of the group (GQA). Values: each position's
// row widened once per tile pass and accumulated into up to 4 heads x 64 dims
// held in registers. An fp8 cache's keys are widened into a bf16 tile first
// (every e4m3 value is exactly a bf16) and each key's scale multiplies its
// score; each value's scale multiplies its probability.
constexpr int kTile = 16;

// sum16(v)[lane] = the sum of one v[t]'s 16 lanes; which t lands in which lane
// is fixed by the shuffles, and sum16_order() undoes it.
AVX512_BF16 inline __m512 sum16_raw(const __m512* v) {
  __m512 w[8], u[4], p[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)
    p[i] = _mm512_add_ps(_mm512_shuffle_ps(u[i], u[i + 2], 0x44), _mm512_shuffle_ps(u[i], u[i + 2], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_ps(p[0], p[1], 0x88), _mm512_shuffle_ps(p[0], p[1], 0xDD));
}

// The permutation that puts v[t]'s sum in lane t, found by summing v[t] = t.
AVX512_BF16 __m512i sum16_order() {
  __m512 v[kTile];
  for (int t = 0; t < kTile; ++t) v[t] = _mm512_set1_ps(static_cast<float>(t));
  alignas(64) float lanes[kTile];
  alignas(64) int32_t index[kTile];
  _mm512_store_ps(lanes, sum16_raw(v));
  for (int lane = 0; lane < kTile; ++lane) index[static_cast<int>(lanes[lane]) / kTile] = lane;
  return _mm512_load_si512(index);
}

AVX512_BF16 inline __m512 sum16(const __m512* v, __m512i order) {
  return _mm512_permutexvar_ps(order, sum16_raw(v));
}

// n values as bf16 pairs for VDPBF16PS, zero past n (n <= 32).
AVX512_BF16 inline __m512bh load_pairs(const uint16_t* p, int64_t n) {
  const __mmask32 mask = n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// Up to 16 consecutive positions of one KV head: a pointer to each key and value
// row (bf16 or fp8 bytes), each position's scale, and how many are real.
struct Tile {
  const void* k[kTile];
  const void* v[kTile];
  float k_scale[kTile], v_scale[kTile];
  int n = 0;
};

// The cache is read once per step: each row's keys (or values) of the tile two
// ahead are fetched into L2 while this tile computes. The hardware prefetchers
// miss these rows (one head's part of each position, positions 256 to 1152 bytes
// apart, blocks scattered in the pool): at 32 rows x 350 positions of SmolLM2
// attention took 16-17 ms a step with this and 26-28 ms without. The T1 hint
// (L2) matters: T0 gained nothing on Zen 4. noipa: GCC sees a function of
// prefetches alone as having no effect and deletes its calls.
constexpr size_t kPrefetchTiles = 2;
__attribute__((noipa)) void prefetch_rows(const std::vector<Tile>& tiles, size_t ti, int64_t row_bytes, bool keys) {
  if (ti + kPrefetchTiles >= tiles.size()) return;
  const Tile& ahead = tiles[ti + kPrefetchTiles];
  for (int j = 0; j < ahead.n; ++j) {
    const char* row = static_cast<const char*>(keys ? ahead.k[j] : ahead.v[j]);
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
  }
}

struct AttendScratch {
  std::vector<float> scores;
  std::vector<uint16_t> keys;  // an fp8 tile's keys widened to bf16
  std::vector<Tile> tiles;
};

// Scores of the query heads [g0, g1) of KV head kvh (their q rows at `q`, bf16,
// D apart) against every tile, into scores[(g - g0) * ctx + t], times `scale`.
// Returns nothing; best[g - g0] gets each head's largest score.
AVX512_BF16 void tile_scores(const uint16_t* q, int64_t G, const std::vector<Tile>& tiles, bool fp8,
                             const float* lut, int64_t D, int64_t ctx, float scale, __m512i order,
                             AttendScratch& w, float* best) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const int64_t row_bytes = fp8 ? D : 2 * D;
  __m512 best_v[8];
  for (int64_t g = 0; g < G; ++g) best_v[g] = neg_inf;  // G <= 8, as attend() splits heads
  w.keys.resize(kTile * D);
  int64_t t0 = 0;
  for (size_t ti = 0; ti < tiles.size(); ++ti) {
    const Tile& tile = tiles[ti];
    prefetch_rows(tiles, ti, row_bytes, true);
    const uint16_t* rows[kTile];
    for (int j = 0; j < kTile; ++j) {
      const int jj = j < tile.n ? j : 0;  // past n: any real row; its lanes are dropped
      if (fp8) {
        uint16_t* dst = w.keys.data() + jj * D;
        if (j < tile.n) {
          const auto* src = static_cast<const uint8_t*>(tile.k[j]);
          for (int64_t i = 0; i < D; ++i) dst[i] = bf16(lut[src[i]]).x;
        }
        rows[j] = dst;
      } else {
        rows[j] = static_cast<const uint16_t*>(tile.k[jj]);
      }
    }
    const __mmask16 live = static_cast<__mmask16>((1u << tile.n) - 1);
    __m512 mult = _mm512_set1_ps(scale);
    if (fp8) mult = _mm512_mul_ps(mult, _mm512_maskz_loadu_ps(live, tile.k_scale));
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc[kTile];
      for (int j = 0; j < kTile; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        const int64_t n = std::min<int64_t>(32, D - d);
        const __m512bh qv = load_pairs(q + g * D + d, n);
        for (int j = 0; j < kTile; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], qv, load_pairs(rows[j] + d, n));
      }
      const __m512 r = _mm512_mul_ps(sum16(acc, order), mult);
      _mm512_mask_storeu_ps(w.scores.data() + g * ctx + t0, live, r);
      best_v[g] = _mm512_mask_max_ps(best_v[g], live, best_v[g], r);
    }
    t0 += tile.n;
  }
  for (int64_t g = 0; g < G; ++g) best[g] = _mm512_reduce_max_ps(best_v[g]);
}

// acc[g][0..D) = sum over positions of (e[g][t] * inv_total[g]) * v[t] (e: the
// exponentiated scores), for up to 4 heads, 64 dims a pass; out (bf16) rows D apart.
AVX512_BF16 void tile_values(const std::vector<Tile>& tiles, bool fp8, const float* lut, const float* e,
                             const float* inv_total, int64_t G, int64_t D, int64_t ctx, bf16* out) {
  constexpr int kHeads = 4, kVecs = 4;
  const int64_t row_bytes = fp8 ? D : 2 * D;
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const int64_t gn = std::min<int64_t>(kHeads, G - g0);
    for (int64_t d0 = 0; d0 < D; d0 += 16 * kVecs) {
      __mmask16 mask[kVecs];
      for (int i = 0; i < kVecs; ++i) mask[i] = d0 + 16 * i < D ? mask_to(d0 + 16 * i, D) : __mmask16(0);
      __m512 acc[kHeads][kVecs];
      for (int h = 0; h < kHeads; ++h)
        for (int i = 0; i < kVecs; ++i) acc[h][i] = _mm512_setzero_ps();
      int64_t t = 0;
      for (size_t ti = 0; ti < tiles.size(); ++ti) {
        const Tile& tile = tiles[ti];
        if (g0 == 0 && d0 == 0) prefetch_rows(tiles, ti, row_bytes, false);
        for (int j = 0; j < tile.n; ++j, ++t) {
          __m512 v[kVecs];
          if (fp8) {
            const auto* src = static_cast<const uint8_t*>(tile.v[j]) + d0;
            for (int i = 0; i < kVecs; ++i) {
              const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask[i], src + 16 * i));
              v[i] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask[i], idx, lut, 4);
            }
          } else {
            const bf16* src = static_cast<const bf16*>(tile.v[j]) + d0;
            for (int i = 0; i < kVecs; ++i) v[i] = load_f32(src + 16 * i, mask[i]);
          }
          const float vs = fp8 ? tile.v_scale[j] : 1.f;
          for (int h = 0; h < kHeads; ++h) {
            if (h >= gn) break;
            const __m512 ph = _mm512_set1_ps(e[(g0 + h) * ctx + t] * inv_total[g0 + h] * vs);
            for (int i = 0; i < kVecs; ++i) acc[h][i] = _mm512_fmadd_ps(ph, v[i], acc[h][i]);
          }
        }
      }
      for (int h = 0; h < gn; ++h)
        for (int i = 0; i < kVecs; ++i) store_bf16(out + (g0 + h) * D + d0 + 16 * i, acc[h][i], mask[i]);
    }
  }
}

// out[m, h] = softmax(q k^T * scale) v over positions 0..pos[m], for every query
// head. Work items are (row, KV head, a share of that KV head's query heads):
// at least two per thread where the heads allow, so one row still uses every
// thread. Positions are walked block by block of the row's table.
AVX512_BF16 void attend(const bf16* qkv, const KVStore& k_layer, const KVStore& v_layer, const int32_t* tables,
                        const int64_t* positions, bf16* out, const Shape& s, int threads) {
  const int64_t group = s.Hq / s.Hkv, qkv_width = (s.Hq + 2 * s.Hkv) * s.D, row_stride = s.Hkv * s.D;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const bool fp8 = k_layer.bytes != nullptr;
  const int64_t pairs = s.M * s.Hkv;
  // heads per item: at most 8 (tile_scores' registers), fewer when rows are few
  int64_t shares = std::max<int64_t>((group + 7) / 8, std::min<int64_t>(group, (2 * threads + pairs - 1) / pairs));
  const int64_t per_share = (group + shares - 1) / shares;
  shares = (group + per_share - 1) / per_share;
  static const __m512i order = sum16_order();
#pragma omp parallel num_threads(threads)
  {
    thread_local AttendScratch w;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < pairs * shares; ++item) {
      const int64_t m = item / (s.Hkv * shares), kvh = (item / shares) % s.Hkv, share = item % shares;
      const int64_t g0 = share * per_share, G = std::min(group, g0 + per_share) - g0, ctx = positions[m] + 1;
      const int32_t* table = tables + m * s.table_width;
      w.tiles.clear();
      for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += s.block_size, ++b) {
        const int64_t base = static_cast<int64_t>(table[b]) * s.block_size, n = std::min(s.block_size, ctx - t0);
        for (int64_t o = 0; o < n; ++o) {
          if (w.tiles.empty() || w.tiles.back().n == kTile) w.tiles.emplace_back();
          Tile& tile = w.tiles.back();
          const int64_t at = (base + o) * row_stride + kvh * s.D, head = (base + o) * s.Hkv + kvh;
          if (fp8) {
            tile.k[tile.n] = k_layer.bytes + at;
            tile.v[tile.n] = v_layer.bytes + at;
            tile.k_scale[tile.n] = k_layer.scales[head];
            tile.v_scale[tile.n] = v_layer.scales[head];
          } else {
            tile.k[tile.n] = k_layer.rows + at;
            tile.v[tile.n] = v_layer.rows + at;
          }
          ++tile.n;
        }
      }
      w.scores.resize(G * ctx);
      float best[8];
      const int64_t h0 = kvh * group + g0;
      tile_scores(reinterpret_cast<const uint16_t*>(qkv + m * qkv_width + h0 * s.D), G, w.tiles, fp8, k_layer.lut,
                  s.D, ctx, scale, order, w, best);
      float inv_total[8];
      for (int64_t g = 0; g < G; ++g) inv_total[g] = 1.f / exp_shifted_sum(w.scores.data() + g * ctx, ctx, best[g]);
      tile_values(w.tiles, fp8, v_layer.lut, w.scores.data(), inv_total, G, s.D, ctx,
                  out + m * s.Hq * s.D + h0 * s.D);
    }
  }
}

}  // namespace wallperf_avx512bf16
