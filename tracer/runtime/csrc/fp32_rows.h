// The fp32 streaming kernel's inner loops, shared by tpserve::linear (linear.cpp) and the quantized
// linears' prompt path (linear_quantized.cpp, on tiles of dequantized weights).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "simd.h"

namespace tpserve_fp32 {

using tpserve_simd::horizontal_sum;

// R weight rows [n, n + R) times M input rows; x [M, K], w [N, K], y [M, N] (row-major). Prefetches
// each weight row `ahead` bytes on (0: the tile is already on its way to the cache).
template <int M, int R>
__attribute__((target("avx2,fma"))) void weight_rows(const float* x, const float* w, const float* bias, float* y,
                                                     int64_t K, int64_t N, int64_t n, int64_t ahead) {
  __m256 acc[R][M];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* row = w + (n + r) * K + k;
      wv[r] = _mm256_loadu_ps(row);
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(row) + ahead, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* row = w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += row[kk] * x[m * K + kk];
      y[m * N + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

// Enough independent accumulators to hide the FMA latency, few enough to stay in 16 registers.
template <int M>
inline void rows_kernel(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N, int64_t begin,
                 int64_t end, int64_t ahead) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 3 : (M <= 6 ? 2 : 1));
  int64_t n = begin;
  for (; n + R <= end; n += R) weight_rows<M, R>(x, w, bias, y, K, N, n, ahead);
  for (; n < end; ++n) weight_rows<M, 1>(x, w, bias, y, K, N, n, ahead);
}

using RowsKernel = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                            int64_t);
constexpr int64_t kMaxRows = 8;  // one pass over the weights for all rows
constexpr RowsKernel kKernels[kMaxRows] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>,
                                           rows_kernel<5>, rows_kernel<6>, rows_kernel<7>, rows_kernel<8>};

}  // namespace tpserve_fp32
