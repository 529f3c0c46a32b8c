// y = x @ W^T in bf16 for decode batch sizes: a GEMV that streams a row-major
// W once (gemv_bf16.h), and a GEMM over a W packed once into panels that
// reuses every weight across all rows of x (gemm_bf16.h).
#include <ATen/ops/constant_pad_nd.h>

#include "gemm_bf16.h"

namespace {

using namespace wallperf_gemv;

void check_bf16(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::", op, " needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "wallperf::", op,
              " takes bfloat16 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "wallperf::", op, " takes contiguous tensors");
}

const uint16_t* bits(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr<at::BFloat16>()); }

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "wallperf::linear_bf16 takes x (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  check_bf16(x, weight, "linear_bf16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  gemv(bits(x), bits(weight), y.mutable_data_ptr<at::BFloat16>(), M, K, N, at::get_num_threads());
  return y;
}

// weight (N, K) -> its panels (gemm_bf16.h), shaped (N rounded up to 16, K rounded up to even).
at::Tensor pack_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "wallperf::pack_bf16 takes weight (N, K), got ", weight.sizes());
  check_bf16(weight, weight, "pack_bf16");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor packed = at::empty({wallperf_gemm::padded_n(N), wallperf_gemm::padded_k(K)}, weight.options());
  wallperf_gemm::pack_panels(bits(weight), reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<at::BFloat16>()), N,
                             K);
  return packed;
}

// x (M, K) @ W^T with W (n, K) given as pack_bf16(W).
at::Tensor linear_packed_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && packed.size(0) == wallperf_gemm::padded_n(n) &&
                  packed.size(1) == wallperf_gemm::padded_k(x.size(1)),
              "wallperf::linear_packed_bf16 takes x (M, K) and pack_bf16 of a (", n, ", K) weight, got ", x.sizes(),
              " and ", packed.sizes());
  check_bf16(x, packed, "linear_packed_bf16");
  const int64_t M = x.size(0), K = x.size(1), Kp = packed.size(1);
  // The packed K is even; an odd K's last pair needs a zero in x as well as in W.
  const at::Tensor xp = K == Kp ? x : at::constant_pad_nd(x, {0, Kp - K});
  at::Tensor y = at::empty({M, n}, x.options());
  wallperf_gemm::gemm_packed(bits(xp), bits(packed), y.mutable_data_ptr<at::BFloat16>(), M, Kp, n, n,
                             at::get_num_threads());
  return y;
}

}  // namespace

// A fragment: other wallperf extensions may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(wallperf, m) {
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
  m.def("pack_bf16(Tensor weight) -> Tensor");
  m.def("linear_packed_bf16(Tensor x, Tensor packed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(wallperf, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("pack_bf16", &pack_bf16);
  m.impl("linear_packed_bf16", &linear_packed_bf16);
}
