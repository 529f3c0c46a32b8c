// Paged decode attention for the portable kernel set (portable_kernels.h): every
// query head of a row against the row's positions 0..pos, in fp32 over the bf16
// (or fp8) cache.
//
// A bf16 cache (attend_pieces) is read in pieces of kPiecePositions positions: each
// piece's scores, softmax and value sums are computed on their own and a row's pieces
// merged at the end (flash-decoding), so that one long row keeps every thread busy.
// The pieces depend only on the row's length, so a row's result does not depend on the
// rows beside it. An item is (piece, KV heads): every KV head where pieces are many, so
// that each block of the pool is read front to back, one block prefetched ahead (the
// hardware prefetchers lose the thread where blocks are scattered in the pool).
//
// Widening: 2 * Vec::N bf16 values are widened as two fp32 vectors, the even and the
// odd elements (Vec::pairs: a shift and a mask, where widening N values costs a
// zero-extension and a shift). The fp32 query heads and the value sums are kept in that
// "paired" order and put back in order at the end. Scores: kScoreKeys keys at a time,
// each pair of vectors of a key widened once and dotted with up to kScoreHeads query
// heads of the group (GQA): 12 independent vector accumulators, reduced four at a time
// (Vec::hsum4). A block's last partial group of keys reads its last key again in the
// missing places and drops those scores. Values: each position's vectors are widened
// once and accumulated, times each head's e^(score - the piece's largest), into the
// heads' fp32 sums in registers, a block at a time.
//
// An fp8 cache (attend_rows) goes a position at a time through the format's byte table
// (exact), its scales multiplying the score (keys) or the probability (values).
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

constexpr int kScoreKeys = 4, kScoreHeads = 3;

// "Paired" order (see the top): within each run of kPair dims, the Vec::N even dims, then the odd ones.
constexpr int64_t kPair = 2 * Vec::N;

inline void to_paired(const uint16_t* x, int64_t D, float* out) {
  for (int64_t c = 0; c < D; c += kPair)
    for (int64_t i = 0; i < Vec::N; ++i) {
      out[c + i] = bf16_to_f32(x[c + 2 * i]);
      out[c + Vec::N + i] = bf16_to_f32(x[c + 2 * i + 1]);
    }
}

inline void from_paired(const float* x, int64_t D, uint16_t* out) {
  for (int64_t c = 0; c < D; c += kPair)
    for (int64_t i = 0; i < Vec::N; ++i) {
      out[c + 2 * i] = f32_to_bf16(x[c + i]);
      out[c + 2 * i + 1] = f32_to_bf16(x[c + Vec::N + i]);
    }
}

// Keys of a bf16 cache against GN query heads (fp32 in paired order, D apart; D a multiple of
// kPair): scores[g * ld + t] = scale * q_g . k_t for the n keys at slots[0..n).
template <int GN>
void key_scores(const uint16_t* rows, const int64_t* slots, int64_t row_stride, int64_t offset, const float* q,
                int64_t D, float scale, float* scores, int64_t ld, int64_t n) {
  for (int64_t t0 = 0; t0 < n; t0 += kScoreKeys) {
    const uint16_t* key[kScoreKeys];
    for (int j = 0; j < kScoreKeys; ++j) key[j] = rows + slots[std::min(t0 + j, n - 1)] * row_stride + offset;
    F acc[GN][kScoreKeys];
    for (int g = 0; g < GN; ++g)
      for (int j = 0; j < kScoreKeys; ++j) acc[g][j] = Vec::zero();
    for (int64_t d = 0; d < D; d += kPair)
      for (int j = 0; j < kScoreKeys; ++j) {
        F lo, hi;
        Vec::pairs(key[j] + d, lo, hi);
        for (int g = 0; g < GN; ++g) {
          acc[g][j] = Vec::fma(Vec::load(q + g * D + d), lo, acc[g][j]);
          acc[g][j] = Vec::fma(Vec::load(q + g * D + d + Vec::N), hi, acc[g][j]);
        }
      }
    const int64_t m = std::min<int64_t>(kScoreKeys, n - t0);
    for (int g = 0; g < GN; ++g) {
      float sums[4];
      static_assert(kScoreKeys == 4, "Vec::hsum4 reduces four accumulators");
      Vec::hsum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3], sums);
      for (int64_t j = 0; j < m; ++j) scores[g * ld + t0 + j] = sums[j] * scale;
    }
  }
}

// Values of a bf16 cache, kValuePairs pair loads (2 * kValuePairs vectors) of dims at a time
// for GN heads: acc[g * lda + ...] (paired order) += sum over t < n of p[g * ld + t] * v_t, v_t
// the row at slots[t]. Each sum runs over t in order, block after block.
constexpr int kValuePairs = 2, kValueHeads = 3;
constexpr int64_t kValueDims = kValuePairs * kPair;

template <int GN>
void value_block(const uint16_t* rows, const int64_t* slots, int64_t row_stride, int64_t offset, const float* p,
                 int64_t ld, int64_t n, float* acc_io, int64_t lda) {
  F acc[GN][2 * kValuePairs];
  for (int g = 0; g < GN; ++g)
    for (int i = 0; i < 2 * kValuePairs; ++i) acc[g][i] = Vec::load(acc_io + g * lda + i * Vec::N);
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* v = rows + slots[t] * row_stride + offset;
    for (int c = 0; c < kValuePairs; ++c) {
      F lo, hi;
      Vec::pairs(v + c * kPair, lo, hi);
      for (int g = 0; g < GN; ++g) {
        const F pg = Vec::set1(p[g * ld + t]);
        acc[g][2 * c] = Vec::fma(pg, lo, acc[g][2 * c]);
        acc[g][2 * c + 1] = Vec::fma(pg, hi, acc[g][2 * c + 1]);
      }
    }
  }
  for (int g = 0; g < GN; ++g)
    for (int i = 0; i < 2 * kValuePairs; ++i) Vec::store(acc_io + g * lda + i * Vec::N, acc[g][i]);
}

// Prefetch `dims` bf16 values from element `offset` of the rows at slots[t0..t1).
inline void prefetch_span(const uint16_t* rows, const int64_t* slots, int64_t t0, int64_t t1, int64_t row_stride,
                          int64_t offset, int64_t dims) {
  for (int64_t t = t0; t < t1; ++t) prefetch_row(rows + slots[t] * row_stride + offset, 2 * dims);
}

// The fp8 cache, or a head size the paired vectors do not divide: softmax(q k^T / sqrt(D)) v over
// positions 0..pos[m], one KV head (or a share of its query heads) an item, a position at a time.
inline void attend_rows(const bf16* qkv, const KVStore& k_layer, const KVStore& v_layer, const int32_t* tables,
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
      for (int64_t t = 0; t < ctx; ++t) {
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

// Positions in a piece of a row's attention (rounded up to whole blocks; see the top).
constexpr int64_t kPiecePositions = 128;

struct PieceScratch {
  std::vector<int64_t> first, row;
  std::vector<float> part;
};

inline void attend_pieces(const bf16* qkv, const KVStore& k_layer, const KVStore& v_layer, const int32_t* tables,
                          const int64_t* positions, bf16* out, const Shape& s, int threads) {
  const int64_t group = s.Hq / s.Hkv, qkv_width = (s.Hq + 2 * s.Hkv) * s.D, row_stride = s.Hkv * s.D;
  const float scale = 1.f / std::sqrt(static_cast<float>(s.D));
  const int64_t bs = s.block_size, piece = (kPiecePositions + bs - 1) / bs * bs, D = s.D, part_width = D + 2;
  thread_local PieceScratch ps;
  ps.first.resize(s.M + 1);
  int64_t total = 0;
  for (int64_t m = 0; m < s.M; ++m) {
    ps.first[m] = total;
    total += (positions[m] + piece) / piece;
  }
  ps.first[s.M] = total;
  ps.row.resize(total);
  for (int64_t m = 0; m < s.M; ++m)
    for (int64_t p = ps.first[m]; p < ps.first[m + 1]; ++p) ps.row[p] = m;
  ps.part.resize(total * s.Hq * part_width);
  // Work items: (piece, a run of KV heads). With pieces enough for every thread, an item
  // takes every KV head, so each block of the cache is read front to back once a pass.
  const int64_t nk = total >= 4 * threads ? s.Hkv : 1, runs = s.Hkv / nk, items = total * runs;
  const int64_t* first = ps.first.data();
  const int64_t* piece_row = ps.row.data();
  float* part = ps.part.data();
  const auto* krows = reinterpret_cast<const uint16_t*>(k_layer.rows);
  const auto* vrows = reinterpret_cast<const uint16_t*>(v_layer.rows);
#pragma omp parallel num_threads(threads)
  {
    thread_local AttendScratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t p = item / runs, kvh0 = item % runs * nk, m = piece_row[p];
      const int64_t t0 = (p - first[m]) * piece, n = std::min(positions[m] + 1, t0 + piece) - t0;
      const int64_t h0 = kvh0 * group, NH = nk * group, span = nk * D;
      const int32_t* table = tables + m * s.table_width;
      w.slots.resize(n);
      for (int64_t t = 0; t < n; t += bs) {
        const int64_t base = static_cast<int64_t>(table[(t0 + t) / bs]) * bs;
        for (int64_t i = t; i < std::min(n, t + bs); ++i) w.slots[i] = base + (i - t);
      }
      const int64_t* slots = w.slots.data();
      w.q.resize(NH * D);
      const auto* qh = reinterpret_cast<const uint16_t*>(qkv + m * qkv_width + h0 * D);
      for (int64_t h = 0; h < NH; ++h) to_paired(qh + h * D, D, w.q.data() + h * D);
      w.scores.resize(NH * n);
      float* scores = w.scores.data();
      prefetch_span(krows, slots, 0, std::min(n, bs), row_stride, kvh0 * D, span);
      for (int64_t tb = 0; tb < n; tb += bs) {
        const int64_t nb = std::min(bs, n - tb);
        if (tb + bs < n)
          prefetch_span(krows, slots, tb + bs, std::min(n, tb + 2 * bs), row_stride, kvh0 * D, span);
        else
          prefetch_span(vrows, slots, 0, std::min(n, bs), row_stride, kvh0 * D, span);
        for (int64_t kk = 0; kk < nk; ++kk)
          for (int64_t g = 0; g < group; g += kScoreHeads) {
            const float* q = w.q.data() + (kk * group + g) * D;
            float* sc = scores + (kk * group + g) * n + tb;
            const int64_t off = (kvh0 + kk) * D;
            switch (std::min<int64_t>(kScoreHeads, group - g)) {
              case 1: key_scores<1>(krows, slots + tb, row_stride, off, q, D, scale, sc, n, nb); break;
              case 2: key_scores<2>(krows, slots + tb, row_stride, off, q, D, scale, sc, n, nb); break;
              default: key_scores<3>(krows, slots + tb, row_stride, off, q, D, scale, sc, n, nb); break;
            }
          }
      }
      // Per head: the piece's largest score, then e^(score - it) and their sum.
      for (int64_t h = 0; h < NH; ++h) {
        float* sc = scores + h * n;
        float best = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) best = std::max(best, sc[t]);
        float* out_h = part + (p * s.Hq + h0 + h) * part_width;
        out_h[0] = best;
        out_h[1] = exp_shifted_sum(sc, n, best);
        std::fill(out_h + 2, out_h + part_width, 0.f);
      }
      for (int64_t tb = 0; tb < n; tb += bs) {
        const int64_t nb = std::min(bs, n - tb);
        if (tb + bs < n)
          prefetch_span(vrows, slots, tb + bs, std::min(n, tb + 2 * bs), row_stride, kvh0 * D, span);
        for (int64_t kk = 0; kk < nk; ++kk)
          for (int64_t g = 0; g < group; g += kValueHeads) {
            const int64_t gn = std::min<int64_t>(kValueHeads, group - g);
            const float* pr = scores + (kk * group + g) * n + tb;
            float* acc = part + (p * s.Hq + h0 + kk * group + g) * part_width + 2;
            for (int64_t d0 = 0; d0 < D; d0 += kValueDims) {
              const int64_t off = (kvh0 + kk) * D + d0;
              switch (gn) {
                case 1: value_block<1>(vrows, slots + tb, row_stride, off, pr, n, nb, acc + d0, part_width); break;
                case 2: value_block<2>(vrows, slots + tb, row_stride, off, pr, n, nb, acc + d0, part_width); break;
                default: value_block<3>(vrows, slots + tb, row_stride, off, pr, n, nb, acc + d0, part_width); break;
              }
            }
          }
      }
    }
    // Merge each (row, head)'s pieces: sums rescaled to the row's largest score.
    thread_local std::vector<float> merged;
    merged.resize(D);
#pragma omp for schedule(static)
    for (int64_t mh = 0; mh < s.M * s.Hq; ++mh) {
      const int64_t m = mh / s.Hq, h = mh % s.Hq;
      const float* p0 = part + (first[m] * s.Hq + h) * part_width;
      const int64_t np = first[m + 1] - first[m], stride = s.Hq * part_width;
      float best = p0[0];
      for (int64_t c = 1; c < np; ++c) best = std::max(best, p0[c * stride]);
      float total_sum = 0.f;
      for (int64_t d = 0; d < D; d += Vec::N) Vec::store(merged.data() + d, Vec::zero());
      for (int64_t c = 0; c < np; ++c) {
        const float* pc = p0 + c * stride;
        const float f = std::exp(pc[0] - best);  // exactly 1 for the piece that holds the largest
        total_sum += pc[1] * f;
        const F fv = Vec::set1(f);
        for (int64_t d = 0; d < D; d += Vec::N)
          Vec::store(merged.data() + d, Vec::fma(fv, Vec::load(pc + 2 + d), Vec::load(merged.data() + d)));
      }
      const F inv = Vec::set1(1.f / total_sum);
      for (int64_t d = 0; d < D; d += Vec::N) Vec::store(merged.data() + d, Vec::mul(inv, Vec::load(merged.data() + d)));
      from_paired(merged.data(), D, reinterpret_cast<uint16_t*>(out + m * s.Hq * D + h * D));
    }
  }
}

// out[m, h] = softmax(q k^T / sqrt(D)) v over positions 0..pos[m], every query head.
inline void attend(const bf16* qkv, const KVStore& k_layer, const KVStore& v_layer, const int32_t* tables,
                   const int64_t* positions, bf16* out, const Shape& s, int threads) {
  if (k_layer.bytes == nullptr && s.D % kValueDims == 0)
    attend_pieces(qkv, k_layer, v_layer, tables, positions, out, s, threads);
  else
    attend_rows(qkv, k_layer, v_layer, tables, positions, out, s, threads);
}

}  // namespace
}  // namespace wallperf_portable
