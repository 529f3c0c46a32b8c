// y = x @ W^T in bf16 for decode batch sizes: a GEMV that streams W once (see
// gemv_bf16.h for how it is organised and what was measured).
#include "gemv_bf16.h"

namespace {

using namespace wallperf_gemv;

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(cpu_has_avx512_bf16(), "wallperf::linear_bf16 needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "wallperf::linear_bf16 takes x (M, K) and weight (N, K), got ", x.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "wallperf::linear_bf16 takes bfloat16 tensors, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "wallperf::linear_bf16 takes contiguous tensors");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  gemv(reinterpret_cast<const uint16_t*>(x.const_data_ptr<at::BFloat16>()),
       reinterpret_cast<const uint16_t*>(weight.const_data_ptr<at::BFloat16>()), y.mutable_data_ptr<at::BFloat16>(),
       M, K, N, at::get_num_threads());
  return y;
}

}  // namespace

// A fragment: other wallperf extensions may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(wallperf, m) {
  m.def("linear_bf16(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(wallperf, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
}
