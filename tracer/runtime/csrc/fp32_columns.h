// tpserve::linear's kernel for 9 to 96 input rows with AVX-512 (a prompt, a batch of short texts): x
// transposed once, so that one 16-lane vector holds one input feature of 16 rows, and each weight
// broadcast and multiplied with V = ceil(rows / 16) such vectors. The weights are read once, in their
// own layout, for all the rows at once, and the multiply-adds need no sums across lanes afterwards (the
// row kernels of fp32_rows.h multiply 8 rows per pass over a tile of weights, each output a sum of 16
// lanes). Measured here on SmolLM2's 30 layers of linears, 2 threads, weights from memory, against the
// tiles of row kernels: 12-24 rows 1.05-1.1x, 37 rows 1.27x, 48 rows 1.37x. One pass takes up to 48 rows
// (4+ vectors: the transposed input no longer stays near the core, 64 and 96 rows no faster); 49-96 rows
// go in chunks of 48 over tiles of W (1.08-1.19x the tiles and MKL); 128 rows are no faster than MKL.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace tpserve_fp32_columns {

constexpr int kMaxVectors = 3;  // up to 48 input rows in one pass over the weights
constexpr int64_t kMaxRows = 96;  // more: chunks of 48 over tiles of the weights, up to this many rows
constexpr int64_t kTileBytes = 256 * 1024;

// Whether this kernel can take M input rows (tpserve::linear asks both to accept a call and to choose
// it; rows few enough for the row kernels of fp32_rows.h go to those first).
inline bool takes(int64_t M, bool avx512) { return avx512 && M <= kMaxRows; }

// r[i] lane c <- r[c] lane i: a 16 x 16 block transposed in registers.
__attribute__((target("avx512f"))) inline void transpose_16x16(__m512 (&r)[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 i + j], 128-bit lane L: rows 4 i .. 4 i + 3 of column 4 L + j
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 a = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), b = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    const __m512 c = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    const __m512 d = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    t[j] = _mm512_shuffle_f32x4(a, c, 0x88);
    t[8 + j] = _mm512_shuffle_f32x4(a, c, 0xDD);
    t[4 + j] = _mm512_shuffle_f32x4(b, d, 0x88);
    t[12 + j] = _mm512_shuffle_f32x4(b, d, 0xDD);
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// xt [K][V * 16] = x [M, K] transposed, the rows past M zero.
__attribute__((target("avx512f"))) inline void transpose_input(const float* x, int64_t M, int64_t K, int V,
                                                              float* xt) {
  const int64_t width = V * 16;
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16)
    for (int64_t m0 = 0; m0 < width; m0 += 16) {
      __m512 r[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) r[i] = m0 + i < M ? _mm512_loadu_ps(x + (m0 + i) * K + k0) : _mm512_setzero_ps();
      transpose_16x16(r);
#pragma GCC unroll 16
      for (int c = 0; c < 16; ++c) _mm512_storeu_ps(xt + (k0 + c) * width + m0, r[c]);
    }
  for (; k0 < K; ++k0)
    for (int64_t m = 0; m < width; ++m) xt[k0 * width + m] = m < M ? x[m * K + k0] : 0.f;
}

// y[i, 0..4) = a0 .. a3 lane i for the first `count` lanes: four weight rows' outputs for 16 input rows,
// transposed in registers and written four floats per input row.
__attribute__((target("avx512f"))) inline void store_4x16(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* y,
                                                         int64_t N, int64_t count) {
  const __m512 t0 = _mm512_unpacklo_ps(a0, a1), t1 = _mm512_unpackhi_ps(a0, a1);
  const __m512 t2 = _mm512_unpacklo_ps(a2, a3), t3 = _mm512_unpackhi_ps(a2, a3);
  // u[j], 128-bit lane L: the four outputs of input row 4 L + j
  const __m512 u[4] = {_mm512_shuffle_ps(t0, t2, 0x44), _mm512_shuffle_ps(t0, t2, 0xEE),
                       _mm512_shuffle_ps(t1, t3, 0x44), _mm512_shuffle_ps(t1, t3, 0xEE)};
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i)
    if (i < count)
      _mm512_mask_storeu_ps(y + i * N - 4 * (i >> 2), static_cast<__mmask16>(0xF << (4 * (i >> 2))), u[i & 3]);
}

// y[m, n .. n + R) for the M rows of xt [K][V * 16]: R weight rows times V vectors of inputs, each output
// one fp32 sum in the order of k whatever M is (so a row's result does not depend on the other rows of
// the call). Prefetches the weight rows `ahead` rows on.
template <int V, int R>
__attribute__((target("avx512f"))) void weight_rows(const float* xt, const float* w, const float* bias, float* y,
                                                    int64_t M, int64_t K, int64_t N, int64_t n, int64_t ahead) {
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* rows = w + n * K;
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 15) == 0 && ahead)
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(rows + (r + ahead) * K + k), _MM_HINT_T0);
    __m512 xv[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xt + k * V * 16 + v * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 wv = _mm512_set1_ps(rows[r * K + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wv, xv[v], acc[r][v]);
    }
  }
  if (bias)
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_set1_ps(bias[n + r]));
  if constexpr (R % 4 == 0) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v)
#pragma GCC unroll 4
      for (int g = 0; g < R / 4; ++g)
        store_4x16(acc[4 * g][v], acc[4 * g + 1][v], acc[4 * g + 2][v], acc[4 * g + 3][v], y + v * 16 * N + n + 4 * g,
                   N, std::min<int64_t>(16, M - v * 16));
  } else {
    alignas(64) float out[R][V * 16];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) _mm512_store_ps(out[r] + v * 16, acc[r][v]);
    for (int64_t m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[m * N + n + r] = out[r][m];
  }
}

// Weight rows per call: 16 / 12 / 8 for 1 / 2 / 3 vectors of inputs (up to 24 sums, V inputs and the
// broadcast weight in the 32 registers). Fewer vectors, more rows: each weight is loaded once for V
// multiply-adds, and the loads, not the multiply-adds, bound one vector (measured on one core, weights
// in L2: 16 rows at 0.6x the rate of 48).
template <int V>
constexpr int kRows = V == 1 ? 16 : (V == 2 ? 12 : 8);

template <int V>
void rows_kernel(const float* xt, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t begin, int64_t end) {
  constexpr int R = kRows<V>;
  int64_t n = begin;
  for (; n + R <= end; n += R) weight_rows<V, R>(xt, w, bias, y, M, K, N, n, n + 2 * R <= end ? R : 0);
  for (; n + 4 <= end; n += 4) weight_rows<V, 4>(xt, w, bias, y, M, K, N, n, 0);
  for (; n < end; ++n) weight_rows<V, 1>(xt, w, bias, y, M, K, N, n, 0);
}

// y [M, N], rows [begin, end) of W, for x [M, K] of at most kMaxRows rows. Each thread transposes x
// itself (into its own buffer, kept between calls): no serial step before the threads start, and the
// transposed input lies in the core's own cache (48 rows, calls of 768 weight rows: 1.06-1.25x the rate
// of transposing once before the threads start). More than 48 rows: chunks of 48, each multiplied with
// a tile of W while the tile is in L2 (W still comes from memory once).
inline void weight_range(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t K, int64_t N,
                         int64_t begin, int64_t end) {
  using Kernel = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t,
                          int64_t);
  static constexpr Kernel kernels[kMaxVectors] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>};
  constexpr int64_t chunk = 16 * kMaxVectors;
  thread_local std::vector<float> xt;
  const int64_t chunks = (M + chunk - 1) / chunk;
  const auto rows = [&](int64_t c) { return std::min(chunk, M - c * chunk); };
  const auto vectors = [&](int64_t c) { return static_cast<int>((rows(c) + 15) / 16); };
  xt.resize(chunks * K * chunk);
  for (int64_t c = 0; c < chunks; ++c)
    transpose_input(x + c * chunk * K, rows(c), K, vectors(c), xt.data() + c * K * chunk);
  const int64_t tile = chunks == 1 ? end - begin : std::max(chunk, kTileBytes / (K * 4) / chunk * chunk);
  for (int64_t t0 = begin; t0 < end; t0 += tile) {
    const int64_t t1 = std::min(end, t0 + tile);
    for (int64_t c = 0; c < chunks; ++c)
      kernels[vectors(c) - 1](xt.data() + c * K * chunk, w, bias, y + c * chunk * N, rows(c), K, N, t0, t1);
  }
}

}  // namespace tpserve_fp32_columns
