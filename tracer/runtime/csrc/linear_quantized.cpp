// tpserve::linear_int8 and tpserve::linear_int4: y = x W^T + b with weights quantized in groups of 32
// along the input features, each group with its own fp32 scale d and minimum m: w = d * q + m, q in
// 0..255 (int8) or 0..15 (int4: llama.cpp's Q4_1). A scale and a minimum per group hold the GGUF
// blocks exactly (Q4_0, Q4_1 as int4 or int8; Q8_0 as int8: d, m = -128 d) and, measured on SmolLM2,
// int8 in groups agreed with fp32 on 100 % of next tokens where one scale per output feature agreed
// on 96.5 %.
//
// Layouts, per weight row: int8 [N, K] uint8, the q values in order; int4 [N, K / 2] uint8, one
// 16-byte block per group where byte j holds q[j] (low nibble) and q[j + 16] (high nibble). scale and
// minimum [N, K / 32] fp32.
//
// Up to 8 input rows (generation steps), in one op call: each group's q values are widened to fp32
// in registers and multiplied with the fp32 inputs, the sum scaled by d once, plus m times the
// group's input sum (computed once per call); 9-64 rows (prompts): tiles of weights dequantized
// into an L2-sized fp32 buffer for the fp32 kernel. Measured on SmolLM2 (A/B, whole weight set, 2 threads:
// int4 6.6 vs 7.2 ms per 1-row step against dequantizing every weight, q * d + m, in registers).
// Quantizing the inputs to int8 per group as well (llama.cpp's way, integer maddubs dot products)
// was faster still but changed SmolLM2's greedy answer to the capital-of-France question, so the
// inputs stay fp32: weights on the grid are then exact. More rows (long prompts), other CPUs: the
// weights are dequantized for a GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "fp32_rows.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;
constexpr int64_t kMaxTiledRows = 64;           // beyond: dequantized for a GEMM
constexpr int64_t kChunkRows = 4;               // input rows per pass over a tile of weights
constexpr int64_t kTileBytes = 64 * 1024;       // packed weights per tile: stays in L2 across passes
constexpr int64_t kFloatTileBytes = 128 * 1024;  // a prompt's tile of dequantized weights (linear.cpp's)

using tpserve_simd::cpu_has_avx2_fma;
using tpserve_simd::horizontal_sum;
using tpserve_simd::kPrefetchBytes;

// 8 q values of a group, widened to fp32.
__attribute__((target("avx2,fma"))) inline __m256 q8(__m128i bytes) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// A group's 32 q values as two 16-byte halves (weights 0..15 and 16..31), from its Bits-bit row.
template <int Bits>
__attribute__((target("avx2,fma"))) inline void load_group(const uint8_t* row, int64_t g, __m128i& lo, __m128i& hi) {
  if constexpr (Bits == 8) {
    lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kGroup));
    hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * kGroup + 16));
  } else {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    lo = _mm_and_si128(b, low4);
    hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
  }
}

// R weight rows [n, n + R) times M input rows (M <= kChunkRows): per group, the q values (widened
// in registers) times the inputs, scaled by d once; plus m times the group's input sum xs.
template <int Bits, int M, int R>
__attribute__((target("avx2,fma"))) void group_rows(const float* x, const float* xs, int64_t m0, const uint8_t* qw,
                                                    const float* dw, const float* mw, const float* bias, float* y,
                                                    int64_t K, int64_t N, int64_t n) {
  const int64_t G = K / kGroup, row_bytes = K * Bits / 8;
  __m256 acc[R][M];
  float minimum_term[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps(), minimum_term[r][m] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m128i lo[R], hi[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = qw + (n + r) * row_bytes;
      load_group<Bits>(row, g, lo[r], hi[r]);
      if (Bits == 8 || g % 2 == 0)  // int4: a 64-byte line holds two groups, one prefetch for both
        _mm_prefetch(reinterpret_cast<const char*>(row + g * kGroup * Bits / 8) + kPrefetchBytes, _MM_HINT_T0);
    }
    __m256 sum[R][M];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m256 w[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m128i half = c < 2 ? lo[r] : hi[r];
        w[r] = q8(c % 2 ? _mm_unpackhi_epi64(half, half) : half);
      }
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + g * kGroup + c * 8);
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) sum[r][m] = c == 0 ? _mm256_mul_ps(w[r], xv) : _mm256_fmadd_ps(w[r], xv, sum[r][m]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const int64_t wg = (n + r) * G + g;
      const __m256 d = _mm256_broadcast_ss(dw + wg);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        acc[r][m] = _mm256_fmadd_ps(sum[r][m], d, acc[r][m]);
        minimum_term[r][m] += mw[wg] * xs[(m0 + m) * G + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float s = horizontal_sum(acc[r][m]) + minimum_term[r][m];
      y[(m0 + m) * N + n + r] = bias ? s + bias[n + r] : s;
    }
}

// group_rows with 16-lane registers (AVX-512): a group's 32 q values are two registers, so the widening
// and the multiply-adds take half the instructions, and the 32 registers hold 4 weight rows' worth. The
// one-row step is instruction-bound here (SmolLM2's int4 weights, hot in cache, about as fast as from
// memory): SmolLM2's int4 gate/up projection, 1 row, one thread: 104 -> 83 us; 4 rows (multiply-add-bound)
// unchanged. The sums are in another order than the 8-lane path's, the same for every row count.
template <int Bits, int M, int R>
__attribute__((target("avx512f,avx2,fma"))) void group_rows_512(const float* x, const float* xs, int64_t m0,
                                                                const uint8_t* qw, const float* dw, const float* mw,
                                                                const float* bias, float* y, int64_t K, int64_t N,
                                                                int64_t n) {
  const int64_t G = K / kGroup, row_bytes = K * Bits / 8;
  __m512 acc[R][M];
  float minimum_term[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps(), minimum_term[r][m] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    __m512 w0[R], w1[R];  // weights 0..15 and 16..31 of the group
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = qw + (n + r) * row_bytes;
      __m128i lo, hi;
      load_group<Bits>(row, g, lo, hi);
      if (Bits == 8 || g % 2 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + g * kGroup * Bits / 8) + kPrefetchBytes, _MM_HINT_T0);
      w0[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
      w1[r] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
    }
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const float* xg = x + (m0 + m) * K + g * kGroup;
      const __m512 x0 = _mm512_loadu_ps(xg), x1 = _mm512_loadu_ps(xg + 16);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const int64_t wg = (n + r) * G + g;
        const __m512 sum = _mm512_fmadd_ps(w1[r], x1, _mm512_mul_ps(w0[r], x0));
        acc[r][m] = _mm512_fmadd_ps(sum, _mm512_set1_ps(dw[wg]), acc[r][m]);
        // spelled out: left to the compiler, the contraction differed between row counts
        minimum_term[r][m] = std::fma(mw[wg], xs[(m0 + m) * G + g], minimum_term[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      const float s = _mm512_reduce_add_ps(acc[r][m]) + minimum_term[r][m];
      y[(m0 + m) * N + n + r] = bias ? s + bias[n + r] : s;
    }
}

// int4: few enough accumulators and unpacked weights to stay in the 16 vector registers. int8: one
// weight row at a time, one sequential stream per thread, which the hardware prefetcher follows
// (A/B, SmolLM2's int8 weight set read from memory, 2 threads: a 1-row step's linears 8.9-9.1 -> 6.0-6.3
// ms, its 28 MB LM head alone 1.56 -> 0.99 ms; 2 rows 8.3-8.9 -> 7.1-7.8; int4, compute-bound, gains nothing).
// 16 lanes: int4 one row with 4 weight rows at a time (83 us above; 3 rows: 92).
template <int Bits, int M, bool Wide>
void group_block(const float* in, const float* xs, int64_t m0, const uint8_t* qw, const float* dw, const float* mw,
                 const float* bias, float* y, int64_t K, int64_t N, int64_t begin, int64_t end) {
  constexpr int R = Bits == 8 ? 1 : (M == 1 ? (Wide ? 4 : 3) : (M == 2 ? 2 : 1));
  const auto rows = Wide ? group_rows_512<Bits, M, R> : group_rows<Bits, M, R>;
  const auto one_row = Wide ? group_rows_512<Bits, M, 1> : group_rows<Bits, M, 1>;
  int64_t n = begin;
  for (; n + R <= end; n += R) rows(in, xs, m0, qw, dw, mw, bias, y, K, N, n);
  for (; n < end; ++n) one_row(in, xs, m0, qw, dw, mw, bias, y, K, N, n);
}

using GroupBlock = void (*)(const float*, const float*, int64_t, const uint8_t*, const float*, const float*, const float*,
                            float*, int64_t, int64_t, int64_t, int64_t);
template <int Bits, bool Wide>
constexpr GroupBlock kBlocks[kChunkRows] = {group_block<Bits, 1, Wide>, group_block<Bits, 2, Wide>,
                                            group_block<Bits, 3, Wide>, group_block<Bits, 4, Wide>};

// Weight rows [n0, n1) dequantized into w (fp32, [n1 - n0, K]).
template <int Bits>
__attribute__((target("avx2,fma"))) void dequantize_rows(const uint8_t* qw, const float* dw, const float* mw, float* w,
                                                         int64_t K, int64_t n0, int64_t n1) {
  const int64_t G = K / kGroup, row_bytes = K * Bits / 8;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = qw + n * row_bytes;
    float* out = w + (n - n0) * K;
    for (int64_t g = 0; g < G; ++g) {
      __m128i lo, hi;
      load_group<Bits>(row, g, lo, hi);
      if (Bits == 8 || g % 2 == 0)
        _mm_prefetch(reinterpret_cast<const char*>(row + g * kGroup * Bits / 8) + kPrefetchBytes, _MM_HINT_T0);
      const __m256 d = _mm256_broadcast_ss(dw + n * G + g), m = _mm256_broadcast_ss(mw + n * G + g);
      _mm256_storeu_ps(out + g * kGroup, _mm256_fmadd_ps(q8(lo), d, m));
      _mm256_storeu_ps(out + g * kGroup + 8, _mm256_fmadd_ps(q8(_mm_unpackhi_epi64(lo, lo)), d, m));
      _mm256_storeu_ps(out + g * kGroup + 16, _mm256_fmadd_ps(q8(hi), d, m));
      _mm256_storeu_ps(out + g * kGroup + 24, _mm256_fmadd_ps(q8(_mm_unpackhi_epi64(hi, hi)), d, m));
    }
  }
}

at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minimum, int bits) {
  const int64_t N = qweight.size(0), G = scale.size(1);
  at::Tensor values = qweight.view({N, G, kGroup * bits / 8});
  if (bits == 4) values = at::cat({at::bitwise_and(values, 15), at::bitwise_right_shift(values, 4)}, -1);
  return (values.to(at::kFloat) * scale.unsqueeze(-1) + minimum.unsqueeze(-1)).view({N, G * kGroup});
}

template <int Bits>
at::Tensor linear_groups(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const at::Tensor& minimum, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& rows) {
  const char* op = Bits == 8 ? "tpserve::linear_int8" : "tpserve::linear_int4";
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(), op,
              ": qweight must be contiguous uint8 [N, K * ", Bits, " / 8]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8 / Bits;
  TORCH_CHECK(K % kGroup == 0 && scale.sizes() == at::IntArrayRef({N, K / kGroup}) && minimum.sizes() == scale.sizes(),
              op, ": one scale and one minimum per group of 32 weights");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weights ", K);
  // rows: only the first rows of x are real (linear.cpp); the padding rows' outputs are zeros
  const int64_t M = tpserve_simd::used_rows(x, rows);
  // up to 64 rows on any thread count: dequantizing tile by tile beats dequantizing the whole matrix
  // for MKL, which tpserve::linear's one-thread limit (24 rows, fp32 weights ready) does not account for
  const bool stream = x.device().is_cpu() && x.scalar_type() == at::kFloat && M <= kMaxTiledRows &&
                      scale.scalar_type() == at::kFloat && minimum.scalar_type() == at::kFloat &&
                      scale.is_contiguous() && minimum.is_contiguous() && !x.requires_grad() &&
                      (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) && cpu_has_avx2_fma();
  if (!stream && !rows) return at::linear(x, dequantize(qweight, scale, minimum, Bits).to(x.scalar_type()), bias);
  const tpserve_simd::RealRows real = tpserve_simd::real_rows(x, N, M);
  if (M == 0) return real.y;
  if (!stream) {
    at::Tensor out = real.out;
    at::linear_out(out, real.x, dequantize(qweight, scale, minimum, Bits).to(x.scalar_type()), bias);
    return real.y;
  }
  const at::Tensor& y = real.y;
  const at::Tensor xc = real.x.contiguous();
  const float* in = xc.data_ptr<float>();
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const float *dw = scale.data_ptr<float>(), *mw = minimum.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = K * Bits / 8;
  const int64_t grain = std::max<int64_t>(64, (32 * 1024) / row_bytes);
  if (M > tpserve_fp32::kMaxRows) {
    // a prompt: compute-bound, where widening the q values for every pass over the input rows costs
    // more than the multiply; each tile of weights is dequantized once into an L2-sized fp32 buffer
    // and multiplied by linear.cpp's kernel (SmolLM2's weight set, 48 rows, 2 threads: int4 111 -> 77
    // ms, int8 109 -> 80; one thread, against dequantizing the whole matrix for MKL: int4 440 -> 148)
    const int64_t tile_rows = std::max<int64_t>(8, kFloatTileBytes / (K * static_cast<int64_t>(sizeof(float))));
    const tpserve_fp32::Kernels kernels = tpserve_fp32::kernels();
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(std::min(tile_rows, end - begin) * K + 16);
      float* w = buffer.data() + (-reinterpret_cast<uintptr_t>(buffer.data()) / sizeof(float)) % 16;  // 64-byte aligned
      for (int64_t t0 = begin; t0 < end; t0 += tile_rows) {
        const int64_t t1 = std::min(end, t0 + tile_rows);
        dequantize_rows<Bits>(qw, dw, mw, w, K, t0, t1);
        for (int64_t m0 = 0; m0 < M; m0 += kernels.chunk)
          kernels.rows[std::min(kernels.chunk, M - m0) - 1](in + m0 * K, w, bp ? bp + t0 : nullptr, yp + m0 * N + t0,
                                                           K, N, 0, t1 - t0, 0);
      }
    });
    return y;
  }
  std::vector<float> xs(M * (K / kGroup));  // each input group's sum, for the minimum term
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    float sum = 0.f;
    for (int64_t j = 0; j < kGroup; ++j) sum += in[i * kGroup + j];
    xs[i] = sum;
  }
  const int64_t tile = std::max<int64_t>(8, kTileBytes / row_bytes);
  const GroupBlock* blocks = tpserve_simd::use_avx512() ? kBlocks<Bits, true> : kBlocks<Bits, false>;
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      for (int64_t m0 = 0; m0 < M; m0 += kChunkRows)
        blocks[std::min(kChunkRows, M - m0) - 1](in, xs.data(), m0, qw, dw, mw, bp, yp, K, N, t0, t1);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, Tensor? bias=None, Tensor? rows=None) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, Tensor? bias=None, Tensor? rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("linear_int8", TORCH_FN(linear_groups<8>));
  m.impl("linear_int4", TORCH_FN(linear_groups<4>));
}
