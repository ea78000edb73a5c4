// The fp32 streaming kernel's inner loops (tpserve::linear, linear.cpp).
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

// Sums of 8 vectors of 16 lanes, lane m = the sum of h[m]: each vector's lanes are added in the same
// order whatever the other vectors hold, so a row's result does not depend on how many rows share the call.
__attribute__((target("avx512f,avx2,fma"))) inline __m256 sums_of_8(const __m512 (&v)[8]) {
  __m256 h[8];
  for (int i = 0; i < 8; ++i)
    h[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v[i]), 1)));
  const __m256 a0 = _mm256_hadd_ps(h[0], h[1]), a1 = _mm256_hadd_ps(h[2], h[3]);
  const __m256 a2 = _mm256_hadd_ps(h[4], h[5]), a3 = _mm256_hadd_ps(h[6], h[7]);
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);  // [v0..v3 lanes 0-3 | 4-7], [v4..v7 ...]
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// The same with 16 lanes (AVX-512: 32 vector registers, so up to 8 input rows x 3 weight rows of
// accumulators). On CPUs with two 512-bit FMA units it doubles the multiply-add rate (a prompt's
// linears 12-20 % faster there: streaming the weights then bounds them); where 512-bit FMAs run as two
// 256-bit halves (AMD Zen 4) it costs the same.
// x is held in a register for the R weight rows (the compiler would otherwise fold its load into each
// FMA: R + M * R loads per M * R FMAs, more than the two load ports keep up with), and the M sums of a
// weight row are reduced together (sums_of_8) rather than one horizontal sum each.
template <int M, int R>
__attribute__((target("avx512f,avx2,fma"))) void weight_rows_512(const float* x, const float* w, const float* bias,
                                                                 float* y, int64_t K, int64_t N, int64_t n,
                                                                 int64_t ahead) {
  __m512 acc[R][8];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* row = w + (n + r) * K + k;
      wv[r] = _mm512_loadu_ps(row);
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(row) + ahead, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512 xv = _mm512_loadu_ps(x + m * K + k);
      asm("" : "+v"(xv));  // one load of x per step, not one per FMA
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sums_of_8(acc[r]));
    const float* row = w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = sums[m];
      for (int64_t kk = k; kk < K; ++kk) s += row[kk] * x[m * K + kk];
      y[m * N + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

template <int M>
inline void rows_kernel_512(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                            int64_t begin, int64_t end, int64_t ahead) {
  constexpr int R = M <= 4 ? 4 : 3;
  int64_t n = begin;
  for (; n + R <= end; n += R) weight_rows_512<M, R>(x, w, bias, y, K, N, n, ahead);
  for (; n < end; ++n) weight_rows_512<M, 1>(x, w, bias, y, K, N, n, ahead);
}

using RowsKernel = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                            int64_t);
constexpr int64_t kMaxRows = 8;  // one pass over the weights for all rows
constexpr RowsKernel kKernels[kMaxRows] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>,
                                           rows_kernel<5>, rows_kernel<6>, rows_kernel<7>, rows_kernel<8>};
constexpr RowsKernel kKernels512[kMaxRows] = {rows_kernel_512<1>, rows_kernel_512<2>, rows_kernel_512<3>,
                                              rows_kernel_512<4>, rows_kernel_512<5>, rows_kernel_512<6>,
                                              rows_kernel_512<7>, rows_kernel_512<8>};

// The kernels for this CPU (tpserve_simd::use_avx512) and how many input rows one pass over a tile of
// weights takes: 4 with 8 lanes (4 rows x 3 weight rows: 12 FMAs per 7 loads in 16 registers), 8 with 16.
struct Kernels {
  const RowsKernel* rows;  // [M - 1]: M input rows, 1..kMaxRows
  int64_t chunk;
};
inline Kernels kernels() { return tpserve_simd::use_avx512() ? Kernels{kKernels512, 8} : Kernels{kKernels, 4}; }

}  // namespace tpserve_fp32
