// The few vector operations the portable CPU kernels (portable_kernels.h) are
// written in, one struct per instruction set; which one `Vec` names is chosen
// by the macro the build passes (kernels/cpu_linear.py compiles the same source
// once per instruction set, each with its own -m flags):
//   WALLPERF_ISA_AVX512  AVX-512F: 16 fp32 lanes
//   WALLPERF_ISA_AVX2    AVX2 + FMA: 8 lanes
//   WALLPERF_ISA_NEON    AArch64 Advanced SIMD: 4 lanes
//   (none)               scalar C++: 1 lane, any CPU
// bf16 is handled as its bits (uint16_t) and widened to fp32 in registers: a
// bf16 value is the top half of an fp32 one, so widening is a 16-bit shift and
// every product of two bf16 values is exact in fp32. No instruction here needs
// more than its ISA's base extension, and nothing here depends on PyTorch, so
// the Arm build's tests (tests/kernels/neon_driver.cpp) run it standalone.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(WALLPERF_EMULATE_WITH_SIMDE)
// Tests only: the x86 intrinsics computed in portable C by SIMDe (Debian's
// libsimde-dev), so a machine without AVX-512 can check the AVX-512 branch's
// logic. Never used for a build that is timed or shipped.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include <simde/x86/fma.h>
// What SIMDe 0.7.4 lacks, lane by lane as the instructions define it.
#define _mm512_cvtepu16_epi32 wallperf_simde_cvtepu16_epi32
#define _mm512_cvtepi32_epi16 wallperf_simde_cvtepi32_epi16
#define _mm512_cvtps_epi32 wallperf_simde_cvtps_epi32
#define _mm512_reduce_add_ps wallperf_simde_reduce_add_ps
#define _mm512_reduce_max_ps wallperf_simde_reduce_max_ps
static inline simde__m512i wallperf_simde_cvtepu16_epi32(simde__m256i a) {
  uint16_t in[16];
  uint32_t out[16];
  simde_mm256_storeu_si256(reinterpret_cast<simde__m256i*>(in), a);
  for (int i = 0; i < 16; ++i) out[i] = in[i];
  return simde_mm512_loadu_si512(out);
}
static inline simde__m256i wallperf_simde_cvtepi32_epi16(simde__m512i a) {  // truncates each lane
  uint32_t in[16];
  uint16_t out[16];
  simde_mm512_storeu_si512(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<uint16_t>(in[i]);
  return simde_mm256_loadu_si256(reinterpret_cast<const simde__m256i*>(out));
}
static inline simde__m512i wallperf_simde_cvtps_epi32(simde__m512 a) {  // round to nearest even
  float in[16];
  int32_t out[16];
  simde_mm512_storeu_ps(in, a);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<int32_t>(std::nearbyint(in[i]));
  return simde_mm512_loadu_si512(out);
}
static inline float wallperf_simde_reduce_add_ps(simde__m512 a) {
  float in[16];
  simde_mm512_storeu_ps(in, a);
  float s = 0.0f;
  for (int i = 0; i < 16; ++i) s += in[i];
  return s;
}
static inline float wallperf_simde_reduce_max_ps(simde__m512 a) {
  float in[16];
  simde_mm512_storeu_ps(in, a);
  float m = in[0];
  for (int i = 1; i < 16; ++i) m = in[i] > m ? in[i] : m;
  return m;
}
#elif defined(WALLPERF_ISA_AVX2) || defined(WALLPERF_ISA_AVX512)
#include <immintrin.h>
#elif defined(WALLPERF_ISA_NEON)
#include <arm_neon.h>
#endif

namespace wallperf_simd {

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as c10::BFloat16 and PyTorch's casts do; NaN stays a quiet NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// e^x for fp32 lanes: 2^(x log2 e) split into an integer n and f in [-0.5, 0.5],
// 2^f by its Taylor series to degree 6 (relative error < 1e-6), times 2^n.
// Clamped to [-87, 88], where expf is ~0 and finite.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kExpC[6] = {0.6931471805599453f, 0.2402265069591007f, 0.05550410866482158f,
                            0.009618129107628477f, 0.0013333558146428443f, 0.00015403530393381608f};

#if defined(WALLPERF_ISA_AVX512)
struct Vec {
  using F = __m512;
  static constexpr int N = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F widen(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // N (lo, hi) bf16 pairs -> the N lo values and the N hi values as fp32.
  static void pairs(const uint16_t* p, F& lo, F& hi) {
    const __m512i w = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static void narrow(uint16_t* p, F v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }
  static float hsum(F v) { return _mm512_reduce_add_ps(v); }
  static float hmax(F v) { return _mm512_reduce_max_ps(v); }
  // out[i] = the sum of the lanes of a, b, c, d: halves added, then AVX2's tree.
  static void hsum4(F a, F b, F c, F d, float* out) {
    const auto half = [](F v) {
      return _mm256_add_ps(_mm512_castps512_ps256(v),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    };
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(half(a), half(b)), _mm256_hadd_ps(half(c), half(d)));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
  static F round(F v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2i(F n) {  // 2^n for integral n in [-127, 127]
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};
#elif defined(WALLPERF_ISA_AVX2)
struct Vec {
  using F = __m256;
  static constexpr int N = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F widen(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void pairs(const uint16_t* p, F& lo, F& hi) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static void narrow(uint16_t* p, F v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    // packus works within 128-bit halves: (r0-3, r0-3, r4-7, r4-7) -> pick quadwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }
  static float hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(F v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // out[i] = the sum of the lanes of a, b, c, d: three pairwise adds and one
  // add of the halves for all four, instead of four reductions.
  static void hsum4(F a, F b, F c, F d, float* out) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  }
  static F round(F v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static F pow2i(F n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};
#elif defined(WALLPERF_ISA_NEON)
struct Vec {
  using F = float32x4_t;
  static constexpr int N = 4;
  static F zero() { return vdupq_n_f32(0.f); }
  static F set1(float v) { return vdupq_n_f32(v); }
  static F load(const float* p) { return vld1q_f32(p); }
  static void store(float* p, F v) { vst1q_f32(p, v); }
  static F widen(const uint16_t* p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }
  static void pairs(const uint16_t* p, F& lo, F& hi) {
    const uint32x4_t w = vld1q_u32(reinterpret_cast<const uint32_t*>(p));
    lo = vreinterpretq_f32_u32(vshlq_n_u32(w, 16));
    hi = vreinterpretq_f32_u32(vandq_u32(w, vdupq_n_u32(0xffff0000u)));
  }
  static void narrow(uint16_t* p, F v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v);
    const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    uint32x4_t r = vshrq_n_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fff)), lsb), 16);
    const uint32x4_t ordered = vceqq_f32(v, v);
    r = vbslq_u32(ordered, r, vdupq_n_u32(0x7fc0));
    vst1_u16(p, vmovn_u32(r));
  }
  static F fma(F a, F b, F c) { return vfmaq_f32(c, a, b); }
  static F add(F a, F b) { return vaddq_f32(a, b); }
  static F sub(F a, F b) { return vsubq_f32(a, b); }
  static F mul(F a, F b) { return vmulq_f32(a, b); }
  static F div(F a, F b) { return vdivq_f32(a, b); }
  static F max(F a, F b) { return vmaxq_f32(a, b); }
  static F min(F a, F b) { return vminq_f32(a, b); }
  static float hsum(F v) { return vaddvq_f32(v); }
  static float hmax(F v) { return vmaxvq_f32(v); }
  static void hsum4(F a, F b, F c, F d, float* out) { vst1q_f32(out, vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d))); }
  static F round(F v) { return vrndnq_f32(v); }
  static F pow2i(F n) {
    const int32x4_t e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
    return vreinterpretq_f32_s32(vshlq_n_s32(e, 23));
  }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }
};
#else
struct Vec {
  using F = float;
  static constexpr int N = 1;
  static F zero() { return 0.f; }
  static F set1(float v) { return v; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F v) { *p = v; }
  static F widen(const uint16_t* p) { return bf16_to_f32(*p); }
  static void pairs(const uint16_t* p, F& lo, F& hi) {
    lo = bf16_to_f32(p[0]);
    hi = bf16_to_f32(p[1]);
  }
  static void narrow(uint16_t* p, F v) { *p = f32_to_bf16(v); }
  // a * b + c with two roundings: a CPU without FMA would call libm's slow fma().
  static F fma(F a, F b, F c) { return a * b + c; }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F div(F a, F b) { return a / b; }
  static F max(F a, F b) { return a > b ? a : b; }
  static F min(F a, F b) { return a < b ? a : b; }
  static float hsum(F v) { return v; }
  static float hmax(F v) { return v; }
  static void hsum4(F a, F b, F c, F d, float* out) {
    out[0] = a;
    out[1] = b;
    out[2] = c;
    out[3] = d;
  }
  static F round(F v) { return std::nearbyint(v); }
  static F pow2i(F n) { return std::ldexp(1.f, static_cast<int>(n)); }
  static void prefetch(const void* p) { __builtin_prefetch(p, 0, 2); }
};
#endif

inline Vec::F exp(Vec::F x) {
  const Vec::F t = Vec::mul(Vec::min(Vec::max(x, Vec::set1(-87.f)), Vec::set1(88.f)), Vec::set1(kLog2e));
  const Vec::F n = Vec::round(t);
  const Vec::F f = Vec::sub(t, n);
  Vec::F p = Vec::set1(kExpC[5]);
  for (int i = 4; i >= 0; --i) p = Vec::fma(p, f, Vec::set1(kExpC[i]));
  p = Vec::fma(p, f, Vec::set1(1.f));
  return Vec::mul(p, Vec::pow2i(n));
}

}  // namespace wallperf_simd
