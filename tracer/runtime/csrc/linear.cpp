// tpserve::linear: y = x W^T + b, streaming the weights once for inputs of a few rows.
//
// A decoder's generation step multiplies a handful of rows (one token per sequence) by every weight
// matrix: the work is reading the weights from memory. MKL's sgemm packs the weight matrix first for
// such shapes and runs at a fraction of the memory bandwidth (measured here: 4 rows x 1536x576 take
// 2.5x the time of 1 row). This kernel reads each weight row once, multiplies it with all input rows
// (AVX2 + FMA, fp32 accumulation) and splits the output features over the intra-op threads. Other
// shapes, dtypes, devices and CPUs without AVX2 go to at::linear, so the op is safe to record in
// any traced graph.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>






namespace {

constexpr int64_t kMaxRows = 8;  // above this, MKL's blocked GEMM is compute-efficient again
// Prefetch this many floats (4 KB) ahead in each weight row: the hardware prefetcher alone left
// 4-row steps at ~13 GB/s here, with it ~17 GB/s (whole SmolLM2 weight set, 2 threads).
constexpr int64_t kPrefetchAhead = 1024;

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

__attribute__((target("avx2,fma"))) inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// R weight rows [n, n + R) times M input rows; x [M, K], w [N, K], y [M, N] (row-major).
template <int M, int R>
__attribute__((target("avx2,fma"))) void weight_rows(const float* x, const float* w, const float* bias, float* y,
                                                     int64_t K, int64_t N, int64_t n) {
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
      wv[r] = _mm256_loadu_ps(w + (n + r) * K + k);
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k + kPrefetchAhead), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* wr = w + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += wr[kk] * x[m * K + kk];
      y[m * N + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

// Enough independent accumulators to hide the FMA latency, few enough to stay in 16 registers.
template <int M>
void rows_kernel(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t N,
                 int64_t begin, int64_t end) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 3 : (M <= 6 ? 2 : 1));
  int64_t n = begin;
  for (; n + R <= end; n += R) weight_rows<M, R>(x, w, bias, y, K, N, n);
  for (; n < end; ++n) weight_rows<M, 1>(x, w, bias, y, K, N, n);
}

using RowsKernel = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr RowsKernel kKernels[kMaxRows] = {rows_kernel<1>, rows_kernel<2>, rows_kernel<3>, rows_kernel<4>,
                                           rows_kernel<5>, rows_kernel<6>, rows_kernel<7>, rows_kernel<8>};

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const bool streamable = x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                          weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1) && x.numel() > 0 &&
                          x.numel() / x.size(-1) <= kMaxRows && weight.is_contiguous() &&
                          (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) &&
                          !x.requires_grad() && !weight.requires_grad() && cpu_has_avx2_fma();
  if (!streamable) return at::linear(x, weight, bias);
  const int64_t K = weight.size(1), N = weight.size(0), M = x.numel() / K;
  const at::Tensor xc = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const RowsKernel kernel = kKernels[M - 1];
  // contiguous blocks of output features per thread: each thread streams its own part of W
  const int64_t grain = std::max<int64_t>(64, (64 * 1024) / (K * static_cast<int64_t>(sizeof(float))));
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { kernel(xp, wp, bp, yp, K, N, begin, end); });
  return y;
}

// ---- int8 weights, one fp32 scale per output feature (weight-only quantization) ----------------
// y[m, n] = scale[n] * sum_k q[n, k] x[m, k] (+ bias[n]): the scale factors out of the dot product,
// so the kernel streams 1 byte per weight and converts 8 of them to fp32 per step.
template <int M, int R>
__attribute__((target("avx2,fma"))) void int8_rows(const float* x, const int8_t* q, const float* scale,
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
      const int8_t* row = q + (n + r) * K + k;
      wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row))));
      _mm_prefetch(reinterpret_cast<const char*>(row + 4 * kPrefetchAhead), _MM_HINT_T0);
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const int8_t* row = q + (n + r) * K;
    for (int m = 0; m < M; ++m) {
      float s = horizontal_sum(acc[r][m]);
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(row[kk]) * x[m * K + kk];
      s *= scale[n + r];
      y[m * N + n + r] = bias ? s + bias[n + r] : s;
    }
  }
}

template <int M>
void int8_kernel(const float* x, const int8_t* q, const float* scale, const float* bias, float* y, int64_t K,
                 int64_t N, int64_t begin, int64_t end) {
  constexpr int R = M <= 2 ? 4 : (M <= 4 ? 3 : (M <= 6 ? 2 : 1));
  int64_t n = begin;
  for (; n + R <= end; n += R) int8_rows<M, R>(x, q, scale, bias, y, K, N, n);
  for (; n < end; ++n) int8_rows<M, 1>(x, q, scale, bias, y, K, N, n);
}

using Int8Kernel = void (*)(const float*, const int8_t*, const float*, const float*, float*, int64_t, int64_t,
                            int64_t, int64_t);
constexpr Int8Kernel kInt8Kernels[kMaxRows] = {int8_kernel<1>, int8_kernel<2>, int8_kernel<3>, int8_kernel<4>,
                                               int8_kernel<5>, int8_kernel<6>, int8_kernel<7>, int8_kernel<8>};

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar, "tpserve::linear_int8: qweight must be int8 [N, K]");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == qweight.size(0), "tpserve::linear_int8: one scale per output feature");
  const bool streamable = x.device().is_cpu() && x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat &&
                          x.size(-1) == qweight.size(1) && x.numel() > 0 && x.numel() / x.size(-1) <= kMaxRows &&
                          qweight.is_contiguous() && scale.is_contiguous() &&
                          (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) && cpu_has_avx2_fma();
  if (!streamable) {  // many rows (prefill): dequantize once, then a compute-bound GEMM
    return at::linear(x, qweight.to(x.scalar_type()) * scale.to(x.scalar_type()).unsqueeze(1), bias);
  }
  const int64_t K = qweight.size(1), N = qweight.size(0), M = x.numel() / K;
  const at::Tensor xc = x.contiguous();
  auto shape = x.sizes().vec();
  shape.back() = N;
  at::Tensor y = at::empty(shape, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const Int8Kernel kernel = kInt8Kernels[M - 1];
  const int64_t grain = std::max<int64_t>(64, (64 * 1024) / K);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) { kernel(xp, qp, sp, bp, yp, K, N, begin, end); });
  return y;
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
