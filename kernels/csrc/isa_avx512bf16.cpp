// The CPU ops on the AVX512-BF16 kernels: the GEMV of gemv_bf16.h, the packed
// GEMM of gemm_bf16.h and the row ops and attention of avx512bf16_kernels.h,
// registered as torch.ops.wallperf_avx512bf16. Built without -m flags: only
// the kernels carry the instructions (target attributes).
#include "avx512bf16_kernels.h"
#include "decode_step.h"

namespace {

namespace k512 = wallperf_avx512bf16;
using wallperf_step::bf16;

struct Avx512Bf16Kernels {
  static constexpr const char* kName = "avx512bf16";
  static bool cpu_ok() { return wallperf_gemv::cpu_has_avx512_bf16(); }
  // cpu_linear hands prefill-sized x to PyTorch's GEMM (oneDNN runs bf16
  // natively here), so the op's own GEMV serves every M it is given.
  static constexpr int64_t kPackAbove = std::numeric_limits<int64_t>::max();

  static void pack(const uint16_t* w, uint16_t* packed, int64_t N, int64_t K) {
    wallperf_gemm::pack_panels(w, packed, N, K);
  }
  static void gemv(const uint16_t* x, const uint16_t* w, bf16* y, int64_t M, int64_t K, int64_t N, int threads) {
    wallperf_gemv::gemv(x, w, y, M, K, N, threads);
  }
  static void gemm_packed(const uint16_t* x, const uint16_t* packed, bf16* y, int64_t M, int64_t Kp, int64_t N,
                          int64_t ldy, int threads) {
    wallperf_gemm::gemm_packed(x, packed, y, M, Kp, N, ldy, threads);
  }
  static void rms_norm_rows(const bf16* x, const bf16* w, bf16* y, int64_t M, int64_t H, float eps, int threads) {
    k512::rms_norm_rows(x, w, y, M, H, eps, threads);
  }
  static void swiglu(const bf16* gu, bf16* act, int64_t M, int64_t F, int threads) {
    k512::swiglu(gu, act, M, F, threads);
  }
  static void add_rounded(bf16* x, const bf16* y, int64_t n) { k512::add_rounded(x, y, n); }
  static float exp_shifted_sum(float* scores, int64_t n, float best) {
    return k512::exp_shifted_sum(scores, n, best);
  }
  static void attend(const bf16* qkv, const wallperf_step::KVStore& k, const wallperf_step::KVStore& v,
                     const int32_t* tables, const int64_t* positions, bf16* out, const wallperf_step::Shape& s,
                     int threads) {
    k512::attend(qkv, k, v, tables, positions, out, s, threads);
  }
};

}  // namespace

WALLPERF_REGISTER_CPU_OPS(wallperf_avx512bf16, Avx512Bf16Kernels)
