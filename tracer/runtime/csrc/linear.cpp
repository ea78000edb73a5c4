// tpserve::linear (fp32 weights) and tpserve::linear_int8 (int8 weights, one fp32 scale per output
// feature): y = x W^T + b, streaming the weights once for inputs of a few rows.
//
// A decoder's generation step multiplies a handful of rows (one token per sequence) by every weight
// matrix: the work is reading the weights from memory. MKL's sgemm packs the weight matrix first for
// such shapes and runs at a fraction of the memory bandwidth (measured here: 4 rows x 1536x576 take
// 2.5x the time of 1 row). This kernel reads each weight row once, multiplies it with all input rows
// (AVX2 + FMA, fp32 accumulation) and splits the output features over the intra-op threads; short
// prompts and short texts (up to 64 rows) are done tile by tile, each tile read from memory once. Other
// shapes, dtypes, devices and CPUs without AVX2 go to at::linear, so the op is safe to record in
// any traced graph.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "simd.h"






namespace {

constexpr int64_t kMaxRows = 8;  // one pass over the weights for all rows
// More rows, up to max_streamed_rows() (simd.h): passes of kChunkRows rows over tiles of W small
// enough to stay in L2, so W still comes from memory once.
constexpr int64_t kChunkRows = 4;  // 4 rows x 3 weight rows: 12 FMAs per 7 loads
constexpr int64_t kTileBytes = 128 * 1024;
// Prefetch 4 KB ahead in each weight row: the hardware prefetcher alone left 4-row steps at ~13 GB/s
// here, with it ~17 GB/s (whole SmolLM2 weight set, 2 threads).
constexpr int64_t kPrefetchBytes = 4096;

using tpserve_simd::cpu_has_avx2_fma;
using tpserve_simd::horizontal_sum;
using tpserve_simd::max_streamed_rows;

// 8 weights as fp32: fp32 weights as they are, int8 weights widened (the scale comes at the end).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// R weight rows [n, n + R) times M input rows; x [M, K], w [N, K], y [M, N] (row-major). With int8
// weights, y[m, n] = scale[n] * sum_k w[n, k] x[m, k]: the per-row scale factors out of the sum.
template <typename W, int M, int R>
__attribute__((target("avx2,fma"))) void weight_rows(const float* x, const W* w, const float* scale,
                                                     const float* bias, float* y, int64_t K, int64_t N, int64_t n) {
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
      const W* row = w + (n + r) * K + k;
      wv[r] = load8(row);
      _mm_prefetch(reinterpret_cast<const char*>(row) + kPrefetchBytes, _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const W* row = w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(row[kk]) * x[m * K + kk];
      if (scale) s *= scale[n + r];
      y[m * N + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

// Enough independent accumulators to hide the FMA latency, few enough to stay in 16 registers.
template <typename W, int M>
void rows_kernel(const float* x, const W* w, const float* scale, const float* bias, float* y, int64_t K, int64_t N,
                 int64_t begin, int64_t end) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 3 : (M <= 6 ? 2 : 1));
  int64_t n = begin;
  for (; n + R <= end; n += R) weight_rows<W, M, R>(x, w, scale, bias, y, K, N, n);
  for (; n < end; ++n) weight_rows<W, M, 1>(x, w, scale, bias, y, K, N, n);
}

template <typename W>
using RowsKernel = void (*)(const float*, const W*, const float*, const float*, float*, int64_t, int64_t, int64_t,
                            int64_t);
template <typename W>
constexpr RowsKernel<W> kKernels[kMaxRows] = {rows_kernel<W, 1>, rows_kernel<W, 2>, rows_kernel<W, 3>,
                                              rows_kernel<W, 4>, rows_kernel<W, 5>, rows_kernel<W, 6>,
                                              rows_kernel<W, 7>, rows_kernel<W, 8>};

// y = x W^T (* scale) + bias for x of at most max_streamed_rows() rows; output features split over the
// threads, each thread streaming its own contiguous block of W (tile by tile beyond kMaxRows rows).
template <typename W>
at::Tensor stream_rows(const at::Tensor& x, const at::Tensor& weight, const float* scale,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t K = weight.size(1), N = weight.size(0), M = x.numel() / K;
  const at::Tensor xc = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const W* wp = weight.data_ptr<W>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(64, (64 * 1024) / (K * static_cast<int64_t>(sizeof(W))));
  if (M <= kMaxRows) {
    const RowsKernel<W> kernel = kKernels<W>[M - 1];
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { kernel(xp, wp, scale, bp, yp, K, N, begin, end); });
    return y;
  }
  const int64_t tile = std::max<int64_t>(8, kTileBytes / (K * static_cast<int64_t>(sizeof(W))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += kChunkRows) {
        const int64_t rows = std::min(kChunkRows, M - m0);
        kKernels<W>[rows - 1](xp + m0 * K, wp, scale, bp, yp + m0 * N, K, N, t0, t1);
      }
    }
  });
  return y;
}

bool few_float_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.dim() == 2 && x.dim() >= 1 &&
         x.size(-1) == weight.size(1) && x.numel() > 0 && x.numel() / x.size(-1) <= max_streamed_rows() &&
         weight.is_contiguous() && (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) &&
         !x.requires_grad() && !weight.requires_grad() && cpu_has_avx2_fma();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  if (weight.scalar_type() != at::kFloat || !few_float_rows(x, weight, bias)) return at::linear(x, weight, bias);
  return stream_rows<float>(x, weight, nullptr, bias);
}

// int8 weights, one fp32 scale per output feature (weight-only quantization): 1 byte per weight read.
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "tpserve::linear_int8: qweight must be int8 [N, K]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == qweight.size(0), "tpserve::linear_int8: one scale per output feature");
  if (scale.scalar_type() != at::kFloat || !scale.is_contiguous() || !few_float_rows(x, qweight, bias)) {
    // many rows (prefill): dequantize once, then a compute-bound GEMM
    return at::linear(x, qweight.to(x.scalar_type()) * scale.to(x.scalar_type()).unsqueeze(1), bias);
  }
  return stream_rows<int8_t>(x, qweight, scale.data_ptr<float>(), bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("linear", TORCH_FN(linear));
  m.impl("linear_int8", TORCH_FN(linear_int8));
}
