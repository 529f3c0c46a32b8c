// Paged decode attention for the portable kernel set (portable_kernels.h): for
// each row and KV head, every query head of its group against the row's
// positions 0..pos, in fp32 over the bf16 (or fp8) cache.
//
// Scores: the group's query heads are widened to fp32 once; keys go
// kScoreKeys at a time, each chunk of a key widened once in registers and
// dotted with up to kScoreHeads query heads of the group (GQA): 12 independent
// vector accumulators, where one key against one head at a time was a chain of
// D / Vec::N dependent FMAs and a horizontal sum per score. The block's
// accumulators are reduced four at a time (Vec::hsum4). A last partial block
// reads its last key again in the missing places and drops those scores, so
// every score is the same sum in the same order. (Widening a block of keys into
// fp32 in memory first measured slower on AVX2: its stores and reloads cost
// more than the horizontal sums they saved.) Values: each position's chunk of kValueVecs
// vectors is widened once and accumulated, times each head's probability,
// into the heads' fp32 sums held in registers. The hardware prefetchers miss
// the cache rows (one head's part of each position, blocks scattered in the
// pool), so the rows kPrefetchAhead positions ahead are prefetched into L2.
// An fp8 cache's rows go through the format's byte table (exact) and their
// scales multiply the score (keys) or the probability (values).
#pragma once
#include "portable_kernels.h"
#include "step_types.h"

namespace wallperf_portable {
namespace {

using wallperf_step::bf16;
using wallperf_step::KVStore;
using wallperf_step::Shape;

constexpr int64_t kPrefetchAhead = 8;

struct AttendScratch {
  std::vector<float> q, scores, acc, row, inv_total;
  std::vector<int64_t> slots;
};

inline const void* kv_row(const KVStore& store, int64_t at, bool fp8) {
  return fp8 ? static_cast<const void*>(store.bytes + at) : static_cast<const void*>(store.rows + at);
}

inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) Vec::prefetch(static_cast<const char*>(row) + b);
}

// Keys of a bf16 cache against GN query heads (fp32, D apart, D a multiple of
// Vec::N): scores[g * ctx + t] = scale * q_g . k_t for the keys at slots[0..ctx).
constexpr int kScoreKeys = 4, kScoreHeads = 3;

template <int GN>
void key_scores(const uint16_t* rows, const int64_t* slots, int64_t row_stride, int64_t offset, const float* q,
                int64_t D, float scale, float* scores, int64_t ctx) {
  for (int64_t t0 = 0; t0 < ctx; t0 += kScoreKeys) {
    const uint16_t* key[kScoreKeys];
    for (int j = 0; j < kScoreKeys; ++j) key[j] = rows + slots[std::min(t0 + j, ctx - 1)] * row_stride + offset;
    for (int64_t t = t0 + kPrefetchAhead; t < std::min(ctx, t0 + kPrefetchAhead + kScoreKeys); ++t)
      prefetch_row(rows + slots[t] * row_stride + offset, 2 * D);
    F acc[GN][kScoreKeys];
    for (int g = 0; g < GN; ++g)
      for (int j = 0; j < kScoreKeys; ++j) acc[g][j] = Vec::zero();
    for (int64_t d = 0; d < D; d += Vec::N)
      for (int j = 0; j < kScoreKeys; ++j) {
        const F k = Vec::widen(key[j] + d);
        for (int g = 0; g < GN; ++g) acc[g][j] = Vec::fma(Vec::load(q + g * D + d), k, acc[g][j]);
      }
    const int64_t n = std::min<int64_t>(kScoreKeys, ctx - t0);
    for (int g = 0; g < GN; ++g) {
      float sums[4];
      static_assert(kScoreKeys == 4, "Vec::hsum4 reduces four accumulators");
      Vec::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], sums);
      for (int64_t j = 0; j < n; ++j) scores[g * ctx + t0 + j] = sums[j] * scale;
    }
  }
}

// Values of a bf16 cache: kValueVecs vectors of dims at a time, for up to
// kValueHeads heads, accumulated in registers over every position (each value
// chunk widened once for all the heads); the same sums in the same order as
// one head at a time.
constexpr int kValueVecs = 4, kValueHeads = 3;
constexpr int64_t kValueDims = kValueVecs * Vec::N;

// dst[g * ldd + i] = bf16(sum over t of p[g * ctx + t] * v_t[offset + i]) for g < gn, i < kValueDims;
// v_t is the row at slot slots[t]. pf_bytes > 0: prefetch that many bytes of the rows ahead (the
// first pass over them, which starts at the row's head).
inline void value_block(const KVStore& v_layer, const int64_t* slots, int64_t row_stride, int64_t offset,
                        const float* p, int64_t ctx, int64_t gn, uint16_t* dst, int64_t ldd, int64_t pf_bytes) {
  F acc[kValueHeads][kValueVecs];
  for (int h = 0; h < kValueHeads; ++h)
    for (int i = 0; i < kValueVecs; ++i) acc[h][i] = Vec::zero();
  const auto* rows = reinterpret_cast<const uint16_t*>(v_layer.rows);
  for (int64_t t = 0; t < ctx; ++t) {
    if (pf_bytes && t + kPrefetchAhead < ctx) prefetch_row(rows + slots[t + kPrefetchAhead] * row_stride + offset, pf_bytes);
    const uint16_t* v = rows + slots[t] * row_stride + offset;
    // One widened vector at a time: the heads' accumulators, one value vector
    // and the heads' broadcasts fill AVX2's 16 registers without spilling.
    F ph[kValueHeads];
    for (int h = 0; h < kValueHeads; ++h) ph[h] = Vec::set1(h < gn ? p[h * ctx + t] : 0.f);
    for (int i = 0; i < kValueVecs; ++i) {
      const F vv = Vec::widen(v + i * Vec::N);
      for (int h = 0; h < kValueHeads; ++h)
        if (h < gn) acc[h][i] = Vec::fma(ph[h], vv, acc[h][i]);
    }
  }
  for (int h = 0; h < gn; ++h)
    for (int i = 0; i < kValueVecs; ++i) Vec::narrow(dst + h * ldd + i * Vec::N, acc[h][i]);
}

// out[m, h] = softmax(q k^T / sqrt(D)) v over positions 0..pos[m], every query head.
inline void attend(const bf16* qkv, const KVStore& k_layer, const KVStore& v_layer, const int32_t* tables,
                   const int64_t* positions, bf16* out, const Shape& s, int threads) {
  const int64_t group = s.Hq / s.Hkv, qkv_width = (s.Hq + 2 * s.Hkv) * s.D, row_stride = s.Hkv * s.D;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const bool fp8 = k_layer.bytes != nullptr;
  const int64_t row_bytes = fp8 ? s.D : 2 * s.D;
  // Work items: (row, KV head, a share of its query heads), at least two per
  // thread where the heads allow, so that one row still uses every thread.
  const int64_t pairs = s.M * s.Hkv;
  int64_t shares = std::min<int64_t>(group, (2 * threads + pairs - 1) / pairs);
  const int64_t per_share = (group + shares - 1) / shares;
  shares = (group + per_share - 1) / per_share;
#pragma omp parallel num_threads(threads)
  {
    thread_local AttendScratch w;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < pairs * shares; ++item) {
      const int64_t m = item / (s.Hkv * shares), kvh = (item / shares) % s.Hkv, share = item % shares;
      const int64_t g0 = share * per_share, G = std::min(group, g0 + per_share) - g0, ctx = positions[m] + 1;
      const int64_t h0 = kvh * group + g0;
      const int32_t* table = tables + m * s.table_width;
      // Block by block, without two 64-bit divisions per position.
      w.slots.resize(ctx);
      for (int64_t t0 = 0, b = 0; t0 < ctx; t0 += s.block_size, ++b) {
        const int64_t base = static_cast<int64_t>(table[b]) * s.block_size;
        for (int64_t t = t0; t < std::min(ctx, t0 + s.block_size); ++t) w.slots[t] = base + (t - t0);
      }
      w.q.resize(G * s.D);
      widen_rows(reinterpret_cast<const uint16_t*>(qkv + m * qkv_width + h0 * s.D), G, s.D, s.D, w.q.data());
      w.scores.resize(G * ctx);
      w.row.resize(s.D);
      if (!fp8 && s.D % Vec::N == 0) {
        const auto* rows = reinterpret_cast<const uint16_t*>(k_layer.rows);
        for (int64_t g = 0; g < G; g += kScoreHeads) {
          const float* q = w.q.data() + g * s.D;
          float* sc = w.scores.data() + g * ctx;
          switch (std::min<int64_t>(kScoreHeads, G - g)) {
            case 1: key_scores<1>(rows, w.slots.data(), row_stride, kvh * s.D, q, s.D, scale, sc, ctx); break;
            case 2: key_scores<2>(rows, w.slots.data(), row_stride, kvh * s.D, q, s.D, scale, sc, ctx); break;
            default: key_scores<3>(rows, w.slots.data(), row_stride, kvh * s.D, q, s.D, scale, sc, ctx); break;
          }
        }
      }
      for (int64_t t = 0; t < ctx && (fp8 || s.D % Vec::N); ++t) {
        if (t + kPrefetchAhead < ctx)
          prefetch_row(kv_row(k_layer, w.slots[t + kPrefetchAhead] * row_stride + kvh * s.D, fp8), row_bytes);
        const int64_t at = w.slots[t] * row_stride + kvh * s.D;
        float mult = scale;
        if (fp8) {
          const uint8_t* src = k_layer.bytes + at;
          for (int64_t d = 0; d < s.D; ++d) w.row[d] = k_layer.lut[src[d]];
          mult *= k_layer.scales[w.slots[t] * s.Hkv + kvh];
          for (int64_t g = 0; g < G; ++g) w.scores[g * ctx + t] = dot_f32(w.q.data() + g * s.D, w.row.data(), s.D) * mult;
        } else {
          const auto* key = reinterpret_cast<const uint16_t*>(k_layer.rows + at);
          for (int64_t g = 0; g < G; ++g) w.scores[g * ctx + t] = dot_bf16(w.q.data() + g * s.D, key, s.D) * mult;
        }
      }
      w.inv_total.resize(G);
      float* inv_total = w.inv_total.data();
      for (int64_t g = 0; g < G; ++g) {
        float* sc = w.scores.data() + g * ctx;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < ctx; ++t) best = std::max(best, sc[t]);
        inv_total[g] = 1.f / exp_shifted_sum(sc, ctx, best);
      }
      auto* dst = reinterpret_cast<uint16_t*>(out + m * s.Hq * s.D + h0 * s.D);
      if (!fp8 && s.D % kValueDims == 0) {
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < ctx; ++t) w.scores[g * ctx + t] *= inv_total[g];
        for (int64_t g = 0; g < G; g += kValueHeads) {
          const int64_t gn = std::min<int64_t>(kValueHeads, G - g);
          for (int64_t d0 = 0; d0 < s.D; d0 += kValueDims)
            value_block(v_layer, w.slots.data(), row_stride, kvh * s.D + d0, w.scores.data() + g * ctx, ctx, gn,
                        dst + g * s.D + d0, s.D, g == 0 && d0 == 0 ? row_bytes : 0);
        }
        continue;
      }
      w.acc.assign(G * s.D, 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        if (t + kPrefetchAhead < ctx)
          prefetch_row(kv_row(v_layer, w.slots[t + kPrefetchAhead] * row_stride + kvh * s.D, fp8), row_bytes);
        const int64_t at = w.slots[t] * row_stride + kvh * s.D;
        if (fp8) {
          const uint8_t* src = v_layer.bytes + at;
          for (int64_t d = 0; d < s.D; ++d) w.row[d] = v_layer.lut[src[d]];
          const float vs = v_layer.scales[w.slots[t] * s.Hkv + kvh];
          for (int64_t g = 0; g < G; ++g)
            axpy_f32(w.scores[g * ctx + t] * inv_total[g] * vs, w.row.data(), w.acc.data() + g * s.D, s.D);
        } else {
          const auto* value = reinterpret_cast<const uint16_t*>(v_layer.rows + at);
          for (int64_t g = 0; g < G; ++g)
            axpy_bf16(w.scores[g * ctx + t] * inv_total[g], value, w.acc.data() + g * s.D, s.D);
        }
      }
      for (int64_t i = 0; i < G * s.D; ++i) dst[i] = f32_to_bf16(w.acc[i]);
    }
  }
}

}  // namespace
}  // namespace wallperf_portable
