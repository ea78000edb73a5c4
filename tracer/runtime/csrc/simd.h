// Helpers shared by the AVX2 / AVX-512 kernels (linear.cpp, linear_quantized.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <immintrin.h>

#include <cstdlib>
#include <cstring>

namespace tpserve_simd {

// The kernels are compiled for AVX2 + FMA per function (target attributes) and used only where the
// CPU has both; elsewhere the ops fall back to ATen.
inline bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// AVX-512 (F) for the kernels' 16-lane paths (fp32_rows.h, quantized_blocks.h). TPSERVE_SIMD=avx2 keeps
// them on the 8-lane paths (read on each call: the tests run both paths on an AVX-512 machine).
inline bool use_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma");
  if (!has) return false;
  const char* choice = std::getenv("TPSERVE_SIMD");
  return choice == nullptr || std::strcmp(choice, "avx2") != 0;
}

// Up to how many input rows the streaming kernels beat ATen's GEMM. Measured against MKL (MiniLM and
// SmolLM2 weight sets, fp32): faster up to 64 rows on 2 threads (1.1-1.6x), on 1 thread only up to
// 24 (MKL's blocked GEMM wins from 32 rows on).
inline int64_t max_streamed_rows() { return at::get_num_threads() > 1 ? 64 : 24; }

// How far ahead in each weight row the kernels prefetch. Measured on the whole SmolLM2 weight set, 2
// threads: fp32 4-row steps ~13 -> ~17 GB/s; the int8 / int4 1-row step's linears 13.3 -> 8.6 ms and
// 7.1 -> 5.5 ms (the hardware prefetcher alone falls behind the several rows streamed at once).
constexpr int64_t kPrefetchBytes = 4096;

// How many leading rows of x (its leading dimensions flattened) the linears compute: `rows`' value
// (a one-element tensor: a bucket's real rows, the rest padding), else all of them.
inline int64_t used_rows(const at::Tensor& x, const c10::optional<at::Tensor>& rows) {
  const int64_t all = x.numel() / std::max<int64_t>(1, x.size(-1));
  if (!rows) return all;
  TORCH_CHECK(rows->numel() == 1, "tpserve linear: rows must hold one number");
  return std::clamp<int64_t>(rows->item<int64_t>(), 0, all);
}

// The output of a linear of x with N output features: x's shape with N last.
inline at::Tensor empty_output(const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return at::empty(shape, x.options());
}

// The fp32 output of a linear of x with N output features whose first `used` rows are real, the padding
// rows' outputs zeroed with one memset (the kernels then write the real rows in place: no views per call).
inline at::Tensor output_with_zero_padding(const at::Tensor& x, int64_t N, int64_t used) {
  at::Tensor y = empty_output(x, N);
  const int64_t all = x.numel() / std::max<int64_t>(1, x.size(-1));
  if (used < all) std::memset(y.data_ptr<float>() + used * N, 0, (all - used) * N * sizeof(float));
  return y;
}

// A linear of x with N output features whose first `used` rows are real: the output y with its
// padding rows zeroed, and the real rows of x and of y, flattened to [used, K] and [used, N].
struct RealRows {
  at::Tensor y, x, out;
};
inline RealRows real_rows(const at::Tensor& x, int64_t N, int64_t used) {
  at::Tensor y = empty_output(x, N);
  const at::Tensor flat = y.view({-1, N});
  if (used == flat.size(0)) return {y, x.reshape({-1, x.size(-1)}), flat};  // no padding: no ops to dispatch for it
  flat.narrow(0, used, flat.size(0) - used).zero_();
  return {y, x.reshape({-1, x.size(-1)}).narrow(0, 0, used), flat.narrow(0, 0, used)};
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace tpserve_simd
