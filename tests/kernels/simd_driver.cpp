// The portable CPU micro-kernels (kernels/csrc/portable_kernels.h) on their
// own, without PyTorch, against references computed here in double: built for
// one instruction set by tests/kernels/test_cpu_simd_driver.py (natively for
// scalar and AVX2, with the AArch64 cross compiler for NEON and run under
// qemu-user). Prints one line per check and exits 1 if any fails.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "portable_kernels.h"

namespace {

using wallperf_simd::bf16_to_f32;
using wallperf_simd::f32_to_bf16;
namespace wp = wallperf_portable;

int failures = 0;

void check(bool ok, const char* what, double detail) {
  std::printf("%s %s (%g)\n", ok ? "ok  " : "FAIL", what, detail);
  if (!ok) ++failures;
}

std::vector<uint16_t> randn_bf16(size_t n, unsigned seed, float scale = 1.f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<uint16_t> v(n);
  for (auto& x : v) x = f32_to_bf16(dist(gen));
  return v;
}

// max over outputs of |got - want| / (|want| + atol): bf16 rounding is 2^-9 relative.
double rel_error(const std::vector<uint16_t>& got, const std::vector<double>& want, double atol) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i)
    worst = std::max(worst, std::fabs(bf16_to_f32(got[i]) - want[i]) / (std::fabs(want[i]) + atol));
  return worst;
}

std::vector<double> linear_ref(const std::vector<uint16_t>& x, const std::vector<uint16_t>& w, int64_t M,
                               int64_t K, int64_t N) {
  std::vector<double> y(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += double(bf16_to_f32(x[m * K + k])) * bf16_to_f32(w[n * K + k]);
      y[m * N + n] = s;
    }
  return y;
}

void check_linear(int64_t M, int64_t K, int64_t N) {
  const auto x = randn_bf16(M * K, 1 + M + K), w = randn_bf16(N * K, 2 + N + K);
  const auto want = linear_ref(x, w, M, K, N);
  const double atol = 1e-2 * std::sqrt(double(K));
  char what[96];
  std::vector<uint16_t> y(M * N);
  wp::gemv(x.data(), w.data(), y.data(), M, K, N, 1);
  std::snprintf(what, sizeof what, "gemv M=%lld K=%lld N=%lld", (long long)M, (long long)K, (long long)N);
  check(rel_error(y, want, atol) < 2.0 / 256, what, rel_error(y, want, atol));

  const int64_t Kp = wallperf_pack::padded_k(K), Np = wallperf_pack::padded_n(N);
  std::vector<uint16_t> packed(Np * Kp), xp(M * Kp, 0);
  wallperf_pack::pack_panels(w.data(), packed.data(), N, K, wp::kPanel);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xp[m * Kp + k] = x[m * K + k];
  std::vector<uint16_t> yp(M * N);
  wp::gemm_packed(xp.data(), Kp, packed.data(), yp.data(), M, Kp, N, N, 1);
  std::snprintf(what, sizeof what, "gemm_packed M=%lld K=%lld N=%lld", (long long)M, (long long)K, (long long)N);
  check(rel_error(yp, want, atol) < 2.0 / 256, what, rel_error(yp, want, atol));

  // Each row alone gives the same bits as in the batch.
  bool same = true;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<uint16_t> one(N), one_gemv(N);
    wp::gemm_packed(xp.data() + m * Kp, Kp, packed.data(), one.data(), 1, Kp, N, N, 1);
    wp::gemv(x.data() + m * K, w.data(), one_gemv.data(), 1, K, N, 1);
    for (int64_t n = 0; n < N; ++n) same = same && one[n] == yp[m * N + n] && one_gemv[n] == y[m * N + n];
  }
  std::snprintf(what, sizeof what, "rows independent M=%lld N=%lld", (long long)M, (long long)N);
  check(same, what, 0);
}

void check_row_ops() {
  const int64_t M = 3, H = 77, F = 45;
  const auto x = randn_bf16(M * H, 11, 3.f), w = randn_bf16(H, 12), y_in = randn_bf16(M * H, 13);
  std::vector<uint16_t> y(M * H);
  wp::rms_norm_rows(x.data(), w.data(), y.data(), M, H, 1e-5f, 1);
  std::vector<double> want(M * H);
  for (int64_t m = 0; m < M; ++m) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += double(bf16_to_f32(x[m * H + i])) * bf16_to_f32(x[m * H + i]);
    const double r = 1 / std::sqrt(ss / H + 1e-5);
    for (int64_t i = 0; i < H; ++i) want[m * H + i] = bf16_to_f32(w[i]) * bf16_to_f32(x[m * H + i]) * r;
  }
  check(rel_error(y, want, 1e-3) < 3.0 / 256, "rms_norm_rows", rel_error(y, want, 1e-3));

  const auto gu = randn_bf16(M * 2 * F, 14, 4.f);
  std::vector<uint16_t> act(M * F);
  wp::swiglu(gu.data(), act.data(), M, F, 1);
  std::vector<double> want_act(M * F);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < F; ++i) {
      const double g = bf16_to_f32(gu[m * 2 * F + i]), u = bf16_to_f32(gu[m * 2 * F + F + i]);
      want_act[m * F + i] = g / (1 + std::exp(-g)) * u;
    }
  check(rel_error(act, want_act, 1e-3) < 2.0 / 256, "swiglu", rel_error(act, want_act, 1e-3));

  std::vector<uint16_t> sum = x;
  wp::add_rounded(sum.data(), y_in.data(), M * H);
  std::vector<double> want_sum(M * H);
  for (int64_t i = 0; i < M * H; ++i) want_sum[i] = double(bf16_to_f32(x[i])) + bf16_to_f32(y_in[i]);
  check(rel_error(sum, want_sum, 1e-3) < 1.0 / 256, "add_rounded", rel_error(sum, want_sum, 1e-3));

  std::vector<float> scores(37);
  std::mt19937 gen(15);
  std::normal_distribution<float> dist(0.f, 20.f);
  for (auto& s : scores) s = dist(gen);
  float best = scores[0];
  for (float s : scores) best = std::max(best, s);
  std::vector<double> want_e(scores.size());
  double want_total = 0;
  for (size_t i = 0; i < scores.size(); ++i) want_total += want_e[i] = std::exp(double(scores[i]) - best);
  const float total = wp::exp_shifted_sum(scores.data(), static_cast<int64_t>(scores.size()), best);
  double worst = std::fabs(total - want_total) / want_total;
  for (size_t i = 0; i < scores.size(); ++i) worst = std::max(worst, std::fabs(scores[i] - want_e[i]) / (want_e[i] + 1e-30));
  // fp32 x * log2(e) alone is off by ~|x| * 2^-24 relative: 5e-6 at x = -60.
  check(worst < 1e-5, "exp_shifted_sum", worst);
}

}  // namespace

int main() {
  std::printf("Vec lanes: %d\n", wallperf_simd::Vec::N);
  const int64_t shapes[][3] = {{1, 64, 16}, {1, 33, 17}, {3, 96, 50}, {5, 577, 33}, {9, 128, 96}, {17, 40, 48}};
  for (const auto& s : shapes) check_linear(s[0], s[1], s[2]);
  check_row_ops();
  std::printf("%d failed\n", failures);
  return failures ? 1 : 0;
}
