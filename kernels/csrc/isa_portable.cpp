// The CPU ops on the portable kernels (portable_kernels.h over simd.h), for the
// instruction set this build selects: kernels/cpu_linear.py compiles this file
// once per instruction set, with its -m flags, WALLPERF_ISA_<NAME> and
// WALLPERF_OPS_NS (the torch.ops namespace, wallperf_<isa>).
#include "decode_step.h"
#include "portable_attention.h"

#ifndef WALLPERF_OPS_NS
#error "build with -DWALLPERF_OPS_NS=wallperf_<isa>"
#endif

namespace {

namespace wp = wallperf_portable;
using wallperf_step::bf16;

uint16_t* bits(bf16* p) { return reinterpret_cast<uint16_t*>(p); }
const uint16_t* bits(const bf16* p) { return reinterpret_cast<const uint16_t*>(p); }

struct PortableKernels {
#if defined(WALLPERF_ISA_AVX512)
  static constexpr const char* kName = "avx512";
  static bool cpu_ok() { return __builtin_cpu_supports("avx512f"); }
#elif defined(WALLPERF_ISA_AVX2)
  static constexpr const char* kName = "avx2";
  static bool cpu_ok() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#elif defined(WALLPERF_ISA_NEON)
  static constexpr const char* kName = "neon";
  static bool cpu_ok() { return true; }  // Advanced SIMD is part of every AArch64 CPU
#else
  static constexpr const char* kName = "scalar";
  static bool cpu_ok() { return true; }
#endif
  // From this many rows of x, packing W for the call and reusing each weight
  // across every row beats streaming W once per GEMV tile of rows.
  static constexpr int64_t kPackAbove = 16;

  static void pack(const uint16_t* w, uint16_t* packed, int64_t N, int64_t K) {
    wallperf_pack::pack_panels(w, packed, N, K, wp::kPanel);
  }
  static void gemv(const uint16_t* x, const uint16_t* w, bf16* y, int64_t M, int64_t K, int64_t N, int threads) {
    wp::gemv(x, w, bits(y), M, K, N, threads);
  }
  static void gemm_packed(const uint16_t* x, const uint16_t* packed, bf16* y, int64_t M, int64_t Kp, int64_t N,
                          int64_t ldy, int threads) {
    wp::gemm_packed(x, Kp, packed, bits(y), M, Kp, N, ldy, threads);
  }
  static void rms_norm_rows(const bf16* x, const bf16* w, bf16* y, int64_t M, int64_t H, float eps, int threads) {
    wp::rms_norm_rows(bits(x), bits(w), bits(y), M, H, eps, threads);
  }
  static void swiglu(const bf16* gu, bf16* act, int64_t M, int64_t F, int threads) {
    wp::swiglu(bits(gu), bits(act), M, F, threads);
  }
  static void add_rounded(bf16* x, const bf16* y, int64_t n) { wp::add_rounded(bits(x), bits(y), n); }
  static float exp_shifted_sum(float* scores, int64_t n, float best) { return wp::exp_shifted_sum(scores, n, best); }
  static void attend(const bf16* qkv, const wallperf_step::KVStore& k, const wallperf_step::KVStore& v,
                     const int32_t* tables, const int64_t* positions, bf16* out, const wallperf_step::Shape& s,
                     int threads) {
    wp::attend(qkv, k, v, tables, positions, out, s, threads);
  }
};

}  // namespace

WALLPERF_REGISTER_CPU_OPS(WALLPERF_OPS_NS, PortableKernels)
