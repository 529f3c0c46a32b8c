// One decode step of a Llama-family decoder in bf16 on the CPU, in one call.
//
// At batch 1 a step of SmolLM2-135M is ~270 MB of weights streamed through 121
// GEMVs, plus ~20 small ops per block (norms, RoPE, the cache write, attention,
// SwiGLU, residual adds). Issued one by one from Python, those small ops and the
// dispatch around each GEMV cost as much as the GEMVs' memory traffic. Here the
// whole step runs in C++: the GEMMs of gemm_bf16.h, each over all threads, and
// everything between them on contiguous scratch vectors. The projection and
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
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e4m3fnuz.h>

#include <cmath>
#include <limits>
#include <vector>

#include "gemm_bf16.h"

namespace {

using namespace wallperf_gemv;
using wallperf_gemm::gemm_packed;
using bf16 = at::BFloat16;

inline float to_f(bf16 v) { return static_cast<float>(v); }
inline bf16 to_bf16(float v) { return bf16(v); }  // round to nearest even

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

const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }
const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<bf16>()); }

// A (rows, cols) weight packed by wallperf::pack_bf16; cols must be even, as
// the activations it multiplies are not padded.
void check_weight(const at::Tensor& w, int64_t rows, int64_t cols, const char* name, size_t layer) {
  const int64_t packed_rows = wallperf_gemm::padded_n(rows);
  TORCH_CHECK(cols % 2 == 0 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2 &&
                  w.size(0) == packed_rows && w.size(1) == cols,
              "wallperf::llama_decode_bf16: layer ", layer, " ", name, " must be a (", rows, ", ", cols,
              ") bfloat16 weight packed by wallperf::pack_bf16, shaped (", packed_rows, ", ", cols, "), with ",
              cols, " even; got ", w.scalar_type(), " ", w.sizes());
}

void check_vector(const at::Tensor& w, int64_t n, const char* name, size_t layer) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.numel() == n,
              "wallperf::llama_decode_bf16: layer ", layer, " ", name, " must be a contiguous bfloat16 vector of ",
              n, ", got ", w.scalar_type(), " ", w.sizes());
}

at::Tensor llama_decode_bf16(const at::Tensor& x_in, at::TensorList qkv_w, at::TensorList qkv_b, at::TensorList o_w,
                             at::TensorList gate_up_w, at::TensorList down_w, at::TensorList ln1,
                             at::TensorList ln2, const at::Tensor& norm, const at::Tensor& head,
                             const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             const std::optional<at::Tensor>& k_centre, const at::Tensor& block_tables,
                             const at::Tensor& positions, const at::Tensor& inv_freq, int64_t n_heads,
                             int64_t n_kv_heads, double eps) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::llama_decode_bf16 needs a CPU with AVX512-BF16");
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
  for (size_t l = 0; l < L; ++l) {
    rms_norm_rows(x.data(), ln1[l].const_data_ptr<bf16>(), h.data(), M, H, epsf, threads);
    gemm_packed(bits(h.data()), bits(qkv_w[l]), qkv.data(), M, H, qkv_width, qkv_width, threads);
    if (!qkv_b.empty()) {
      const bf16* b = qkv_b[l].const_data_ptr<bf16>();
      for (int64_t m = 0; m < M; ++m)
        for (int64_t i = 0; i < qkv_width; ++i) qkv[m * qkv_width + i] = to_bf16(to_f(qkv[m * qkv_width + i]) + to_f(b[i]));
    }
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
    attend(qkv.data(), k_layer, v_layer, tables, pos, attn.data(), s, threads);
    gemm_packed(bits(attn.data()), bits(o_w[l]), o.data(), M, q_size, H, H, threads);
    add_rounded(x.data(), o.data(), M * H);
    rms_norm_rows(x.data(), ln2[l].const_data_ptr<bf16>(), h.data(), M, H, epsf, threads);
    gemm_packed(bits(h.data()), bits(gate_up_w[l]), gu.data(), M, H, 2 * s.F, 2 * s.F, threads);
    swiglu(gu.data(), act.data(), M, s.F, threads);
    gemm_packed(bits(act.data()), bits(down_w[l]), d.data(), M, s.F, H, H, threads);
    add_rounded(x.data(), d.data(), M * H);
  }
  rms_norm_rows(x.data(), norm.const_data_ptr<bf16>(), h.data(), M, H, epsf, threads);
  at::Tensor logits = at::empty({M, s.V}, x_in.options());
  gemm_packed(bits(h.data()), bits(head), logits.mutable_data_ptr<bf16>(), M, H, s.V, s.V, threads);
  return logits.to(at::kFloat);
}

// The eager path's RMSNorm and SwiGLU for bf16 rows on the CPU (prefill: hundreds
// to thousands of rows), with the fused step's kernels: PyTorch's reference casts
// to fp32 and back through several full-size temporaries.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::rms_norm_bf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && w.scalar_type() == at::kBFloat16 &&
                  w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              "rms_norm_bf16 takes bfloat16 x (M, H) and a contiguous bfloat16 weight (H,), got ", x.sizes(), " and ",
              w.sizes());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  rms_norm_rows(xc.const_data_ptr<bf16>(), w.const_data_ptr<bf16>(), y.mutable_data_ptr<bf16>(), xc.size(0),
                xc.size(1), static_cast<float>(eps), at::get_num_threads());
  return y;
}

at::Tensor swiglu_bf16(const at::Tensor& gate_up) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::swiglu_bf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16 && gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
              "swiglu_bf16 takes bfloat16 gate_up (M, 2F), got ", gate_up.scalar_type(), " ", gate_up.sizes());
  const at::Tensor gu = gate_up.contiguous();
  const int64_t F = gu.size(1) / 2;
  at::Tensor act = at::empty({gu.size(0), F}, gu.options());
  swiglu(gu.const_data_ptr<bf16>(), act.mutable_data_ptr<bf16>(), gu.size(0), F, at::get_num_threads());
  return act;
}

// softmax over the last dimension of a float32 (rows, n) tensor with the step's
// own exp: exposed so that tests hold it to PyTorch's softmax.
at::Tensor softmax_f32(const at::Tensor& x) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::softmax_f32 needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "softmax_f32 takes float32 (rows, n)");
  at::Tensor y = x.contiguous().clone();
  float* p = y.mutable_data_ptr<float>();
  const int64_t n = y.size(1);
  for (int64_t r = 0; r < y.size(0); ++r) {
    float* row = p + r * n;
    const float best = n ? *std::max_element(row, row + n) : 0.f;
    const float inv_total = 1.f / exp_shifted_sum(row, n, best);
    for (int64_t i = 0; i < n; ++i) row[i] *= inv_total;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(wallperf, m) {
  m.def("softmax_f32(Tensor x) -> Tensor");
  m.def("rms_norm_bf16(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("swiglu_bf16(Tensor gate_up) -> Tensor");
  m.def(
      "llama_decode_bf16(Tensor x, Tensor[] qkv, Tensor[] qkv_bias, Tensor[] o, Tensor[] gate_up, Tensor[] down, Tensor[] ln1, "
      "Tensor[] ln2, Tensor norm, Tensor head, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? k_scale, "
      "Tensor(d!)? v_scale, Tensor? k_centre, Tensor block_tables, "
      "Tensor positions, Tensor inv_freq, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(wallperf, CPU, m) {
  m.impl("llama_decode_bf16", &llama_decode_bf16);
  m.impl("softmax_f32", &softmax_f32);
  m.impl("rms_norm_bf16", &rms_norm_bf16);
  m.impl("swiglu_bf16", &swiglu_bf16);
}
