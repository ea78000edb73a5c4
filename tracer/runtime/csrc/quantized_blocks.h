// tpserve::linear_int8 / linear_int4's few-row kernels: integer dot products on weights laid out in
// blocks of 16 rows.
//
// Layout. Weight rows in blocks of 16 (the last block may hold fewer: R rows). Within a block, per group
// g of 32 input features, chunks of 4 R bytes, each row's 4 bytes in turn: int8, 8 chunks, chunk i
// holding features 32 g + 4 i + j (j = 0..3); int4, 4 chunks, chunk o holding features 32 g + 8 o + j
// in the low nibbles and 32 g + 8 o + 4 + j in the high ones. A block's float16 scales and minimums
// are [G, R] (per group, its rows'). One vector register then holds 16 rows x 4 features, the shape of
// an integer dot-product instruction with 4 input values broadcast, and a group's 16 scales are one load.
//
// Inputs. Each input row's group of 32 values is quantized to two int8 values per input, x ~ step *
// (256 q1 + q2) with step = max|x| / (127 * 256): 16 bits per input, relative error <= 1 / 65024 of the
// group's largest value (one int8 value per input, llama.cpp's Q8_1, changed SmolLM2's greedy answer
// in an earlier try). sum(q * x) over a group = step * ((sum q q1) << 8 + sum q q2), exact in int32;
// the minimum's term uses the group's fp32 sum. Each input row is quantized alone, so a row's result
// does not depend on the rows computed with it. With 8-bit inputs (Bytes = 1: q1 only, step = max|x|
// / 127, error <= max|x| / 254) a group costs half the dot products: the encoder's choice, where many
// rows make the kernel compute-bound and an embedding's cosine, not a greedy token, is what counts.
//
// Why (measured here, Xeon with AVX-512 VNNI, 1 row, 2 threads): widening the q values to fp32 in
// registers left the one-row step instruction-bound (SmolLM2's int4 linears, 80 MB: 4.2 ms, about as
// fast with the weights in cache as from memory); 16 rows per register and VPDPBUSD read them at
// copy bandwidth (2.9 ms; 1 thread, the 3072 x 576 gate/up projection in cache: 87 -> 28 us).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace tpserve_blocks {

constexpr int64_t kGroup = 32;
constexpr int64_t kBlockRows = 16;
constexpr int kMaxRows = 4;  // input rows per pass over a block: 4 x 5 accumulators + 8 weight registers

// The input rows quantized per group (see above): q1, q2 [M, K] (q2 empty for 8-bit inputs); step, sum [M, G].
struct Inputs {
  std::vector<int8_t> q1, q2;
  std::vector<float> step, sum;
};

// `in` resized for M rows of K inputs (quantize_inputs then writes every value used): a kept buffer.
inline void fit_inputs(Inputs& in, int64_t M, int64_t K, int bytes) {
  const int64_t G = K / kGroup;
  in.q1.resize(M * K);
  in.q2.resize(bytes == 2 ? M * K : 0);
  in.step.resize(M * G);
  in.sum.resize(M * G);
}

inline void quantize_group_scalar(const float* x, int8_t* q1, int8_t* q2, float* step, float* sum) {
  float top = 0.f, s = 0.f;
  for (int j = 0; j < kGroup; ++j) top = std::max(top, std::fabs(x[j])), s += x[j];
  const float unit = top > 0.f ? top / 127.f : 1.f, inverse = 1.f / unit;
  for (int j = 0; j < kGroup; ++j) {
    const float a = std::nearbyint(x[j] * inverse);
    const float b = std::nearbyint(std::fma(-a, unit, x[j]) * inverse * 256.f);
    q1[j] = static_cast<int8_t>(std::fmin(std::fmax(a, -128.f), 127.f));  // fmin / fmax: a NaN becomes a number
    if (q2) q2[j] = static_cast<int8_t>(std::fmin(std::fmax(b, -128.f), 127.f));  // (the group's sum keeps it NaN)
  }
  *step = q2 ? unit / 256.f : unit;
  *sum = s;
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) inline void quantize_group_512(const float* x, int8_t* q1,
                                                                                    int8_t* q2, float* step,
                                                                                    float* sum) {
  const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
  const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
  const float unit = top > 0.f ? top / 127.f : 1.f, inverse = 1.f / unit;
  const __m512 u = _mm512_set1_ps(unit), inv = _mm512_set1_ps(inverse), inv256 = _mm512_set1_ps(inverse * 256.f);
  const __m512 xs[2] = {x0, x1};
  for (int h = 0; h < 2; ++h) {
    const __m512 a = _mm512_roundscale_ps(_mm512_mul_ps(xs[h], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 b = _mm512_mul_ps(_mm512_fnmadd_ps(a, u, xs[h]), inv256);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q1 + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(a)));
    if (q2) _mm_storeu_si128(reinterpret_cast<__m128i*>(q2 + 16 * h), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(b)));
  }
  *step = q2 ? unit / 256.f : unit;
  *sum = _mm512_reduce_add_ps(_mm512_add_ps(x0, x1));
}

// Groups [begin, end) of the input rows x (row-major, groups of 32 in turn) into `in`.
inline void quantize_inputs(const float* x, Inputs& in, int64_t begin, int64_t end, bool wide) {
  for (int64_t i = begin; i < end; ++i) {
    int8_t* q2 = in.q2.empty() ? nullptr : &in.q2[i * kGroup];
    if (wide)
      quantize_group_512(x + i * kGroup, &in.q1[i * kGroup], q2, &in.step[i], &in.sum[i]);
    else
      quantize_group_scalar(x + i * kGroup, &in.q1[i * kGroup], q2, &in.step[i], &in.sum[i]);
  }
}

inline int32_t four_bytes(const void* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

// M input rows (from m0) times the block of R rows starting at weight row n0 (a multiple of 16), with
// AVX-512 VNNI: per group, 8 registers of 16 rows x 4 q values, each against 4 inputs broadcast.
template <int Bits, int Bytes, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) void block_512(
    const Inputs& in, int64_t m0, const uint8_t* qw, const uint16_t* dw, const uint16_t* mw, const float* bias,
    float* y, int64_t K, int64_t N, int64_t n0, int R) {
  const int64_t G = K / kGroup, chunk = 4 * R;
  const uint8_t* w = qw + n0 * K * Bits / 8;
  const uint16_t *d = dw + n0 * G, *mn = mw + n0 * G;
  const __mmask64 bytes = R == kBlockRows ? ~0ULL : (1ULL << chunk) - 1;
  const __mmask16 lanes = static_cast<__mmask16>((1U << R) - 1);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i q[8];  // q[i]: the block's rows x features 32 g + 4 i + (0..3)
#pragma GCC unroll 8
    for (int c = 0; c < Bits; ++c) {  // Bits chunks a group: 8 (int8), 4 (int4)
      const uint8_t* p = w + (g * Bits + c) * chunk;
      _mm_prefetch(reinterpret_cast<const char*>(p) + tpserve_simd::kPrefetchBytes, _MM_HINT_T0);
      const __m512i v = _mm512_maskz_loadu_epi8(bytes, p);
      if constexpr (Bits == 8) {
        q[c] = v;
      } else {
        q[2 * c] = _mm512_and_si512(v, low4);
        q[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    }
    const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, d + g * R));
    const __m512 mv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, mn + g * R));
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const int8_t* p1 = &in.q1[(m0 + m) * K + g * kGroup];
      __m512i high[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};  // two chains each: latency
      __m512i low[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        high[i / 4] = _mm512_dpbusd_epi32(high[i / 4], q[i], _mm512_set1_epi32(four_bytes(p1 + 4 * i)));
        if constexpr (Bytes == 2) {
          const int8_t* p2 = &in.q2[(m0 + m) * K + g * kGroup];
          low[i / 4] = _mm512_dpbusd_epi32(low[i / 4], q[i], _mm512_set1_epi32(four_bytes(p2 + 4 * i)));
        }
      }
      __m512i dot = _mm512_add_epi32(high[0], high[1]);
      if constexpr (Bytes == 2) dot = _mm512_add_epi32(_mm512_slli_epi32(dot, 8), _mm512_add_epi32(low[0], low[1]));
      const int64_t mg = (m0 + m) * G + g;
      const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(in.step[mg]));
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(in.sum[mg]), _mm512_fmadd_ps(scaled, dv, acc[m]));
    }
  }
  const __m512 b = bias ? _mm512_maskz_loadu_ps(lanes, bias + n0) : _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * N + n0, lanes, _mm512_add_ps(acc[m], b));
}

// `rows` (<= 8) float16 values widened to fp32, zeros after them.
__attribute__((target("avx2,fma,f16c"))) inline __m256 eight_halves(const uint16_t* p, int rows) {
  if (rows == 8) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  alignas(16) uint16_t part[8] = {};
  for (int i = 0; i < rows; ++i) part[i] = p[i];
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}

// 4 q values of 8 rows (uint8, each <= 15) times 4 int8 inputs, summed per row: VPMADDUBSW + VPMADDWD.
__attribute__((target("avx2,fma,f16c"))) inline __m256i dot4(__m256i q, int32_t inputs) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(q, _mm256_set1_epi32(inputs)), _mm256_set1_epi16(1));
}

// A group's 4 features of 8 rows times 4 int8 inputs: int4's q values as they are, int8's as their low
// nibbles q plus their high nibbles `top` times 16.
template <int Bits>
__attribute__((target("avx2,fma,f16c"))) inline __m256i dot_quad(__m256i q, __m256i top, int32_t inputs) {
  const __m256i low = dot4(q, inputs);
  if constexpr (Bits == 8) return _mm256_add_epi32(low, _mm256_slli_epi32(dot4(top, inputs), 4));
  return low;
}

// block_512 with AVX2: the block as two halves of 8 rows. VPMADDUBSW's 16-bit pair sums cannot saturate
// with 4-bit values (15 * 128 * 2); int8's q values are split into their two nibbles for it.
template <int Bits, int Bytes, int M>
__attribute__((target("avx2,fma,f16c"))) void block_256(const Inputs& in, int64_t m0, const uint8_t* qw,
                                                        const uint16_t* dw, const uint16_t* mw, const float* bias,
                                                        float* y, int64_t K, int64_t N, int64_t n0, int R) {
  const int64_t G = K / kGroup, chunk = 4 * R;
  const uint8_t* w = qw + n0 * K * Bits / 8;
  const uint16_t *d = dw + n0 * G, *mn = mw + n0 * G;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int h = 0; h * 8 < R; ++h) {
    const int rows = std::min(8, R - 8 * h);
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(rows), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m256i q[8], top[8];  // q[i]: 8 rows x features 32 g + 4 i + (0..3); int8: their low nibbles, top the high
#pragma GCC unroll 8
      for (int c = 0; c < Bits; ++c) {
        const uint8_t* p = w + (g * Bits + c) * chunk + 32 * h;
        _mm_prefetch(reinterpret_cast<const char*>(p) + tpserve_simd::kPrefetchBytes, _MM_HINT_T0);
        const __m256i v = _mm256_maskload_epi32(reinterpret_cast<const int*>(p), lanes);
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if constexpr (Bits == 8) {
          q[c] = lo, top[c] = hi;
        } else {
          q[2 * c] = lo, q[2 * c + 1] = hi;
        }
      }
      const __m256 dv = eight_halves(d + g * R + 8 * h, rows), mv = eight_halves(mn + g * R + 8 * h, rows);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const int8_t* p1 = &in.q1[(m0 + m) * K + g * kGroup];
        __m256i high = _mm256_setzero_si256(), low = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          high = _mm256_add_epi32(high, dot_quad<Bits>(q[i], top[i], four_bytes(p1 + 4 * i)));
          if constexpr (Bytes == 2) {
            const int8_t* p2 = &in.q2[(m0 + m) * K + g * kGroup];
            low = _mm256_add_epi32(low, dot_quad<Bits>(q[i], top[i], four_bytes(p2 + 4 * i)));
          }
        }
        const __m256i dot = Bytes == 2 ? _mm256_add_epi32(_mm256_slli_epi32(high, 8), low) : high;
        const int64_t mg = (m0 + m) * G + g;
        const __m256 scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(in.step[mg]));
        acc[m] = _mm256_fmadd_ps(mv, _mm256_set1_ps(in.sum[mg]), _mm256_fmadd_ps(scaled, dv, acc[m]));
      }
    }
    const __m256 b = bias ? _mm256_maskload_ps(bias + n0 + 8 * h, lanes) : _mm256_setzero_ps();
    for (int m = 0; m < M; ++m) _mm256_maskstore_ps(y + (m0 + m) * N + n0 + 8 * h, lanes, _mm256_add_ps(acc[m], b));
  }
}

using Block = void (*)(const Inputs&, int64_t, const uint8_t*, const uint16_t*, const uint16_t*, const float*, float*,
                       int64_t, int64_t, int64_t, int);
template <int Bits, int Bytes>
constexpr Block kBlocks512[kMaxRows] = {block_512<Bits, Bytes, 1>, block_512<Bits, Bytes, 2>,
                                        block_512<Bits, Bytes, 3>, block_512<Bits, Bytes, 4>};
template <int Bits, int Bytes>
constexpr Block kBlocks256[kMaxRows] = {block_256<Bits, Bytes, 1>, block_256<Bits, Bytes, 2>,
                                        block_256<Bits, Bytes, 3>, block_256<Bits, Bytes, 4>};

// AVX-512 with VNNI (TPSERVE_SIMD=avx2 keeps the 8-lane path, as the other kernels do).
inline bool use_vnni() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has && tpserve_simd::use_avx512();
}

}  // namespace tpserve_blocks
