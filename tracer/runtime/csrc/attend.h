// One query's softmax attention over a run of keys and values (AVX2 + FMA; D a multiple of 8): shared
// by a generation step's cached_attention (decoder_ops.cpp) and the encoder's packed_attention
// (encoder_ops.cpp).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "simd.h"

namespace tpserve_attend {

// e^x for 8 floats x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, times 2^n;
// relative error ~1e-7; below -87.3 it returns ~1e-38, not 0).
inline __attribute__((target("avx2,fma"))) __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

// scores[j] <- exp(scores[j] - top) for j < seen (top: their maximum); returns 1 / their sum.
inline __attribute__((target("avx2,fma"))) float exponentiate(float* scores, int64_t seen, float top) {
  // the exponentials 8 at a time (std::exp one by one was most of an encoder's attention)
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 sums = _mm256_setzero_ps();
  int64_t e = 0;
  for (; e + 8 <= seen; e += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + e), top8));
    _mm256_storeu_ps(scores + e, p);
    sums = _mm256_add_ps(sums, p);
  }
  float total = tpserve_simd::horizontal_sum(sums);
  for (; e < seen; ++e) total += (scores[e] = std::exp(scores[e] - top));
  return 1.0f / total;
}

// out[D] = softmax(q . keys[j] * scale (+ bias[j]) over j < seen) . values; keys[j] at keys + j * stride
// (floats), values likewise; scores: room for `seen` floats; bias: null, or `seen` floats added to the
// scores (an encoder's relative position bias).
inline __attribute__((target("avx2,fma"))) void attend_one(const float* q, const float* keys, const float* values,
                                                    int64_t stride, int64_t seen, int64_t D, float scale,
                                                    float* scores, float* out, const float* bias = nullptr) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < seen; ++j) {
    const float* k = keys + j * stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    scores[j] = tpserve_simd::horizontal_sum(acc) * scale + (bias ? bias[j] : 0.0f);
    top = std::max(top, scores[j]);
  }
  const float inv = exponentiate(scores, seen, top);
  // four independent sums per pass over the values (one sum would wait on each FMA's latency)
  int64_t d = 0;
  for (; d + 32 <= D; d += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < seen; ++j) {
      const __m256 s = _mm256_set1_ps(scores[j]);
      const float* v = values + j * stride + d;
      a0 = _mm256_fmadd_ps(s, _mm256_loadu_ps(v), a0);
      a1 = _mm256_fmadd_ps(s, _mm256_loadu_ps(v + 8), a1);
      a2 = _mm256_fmadd_ps(s, _mm256_loadu_ps(v + 16), a2);
      a3 = _mm256_fmadd_ps(s, _mm256_loadu_ps(v + 24), a3);
    }
    const __m256 scale_by = _mm256_set1_ps(inv);
    _mm256_storeu_ps(out + d, _mm256_mul_ps(a0, scale_by));
    _mm256_storeu_ps(out + d + 8, _mm256_mul_ps(a1, scale_by));
    _mm256_storeu_ps(out + d + 16, _mm256_mul_ps(a2, scale_by));
    _mm256_storeu_ps(out + d + 24, _mm256_mul_ps(a3, scale_by));
  }
  for (; d < D; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < seen; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[j]), _mm256_loadu_ps(values + j * stride + d), acc);
    _mm256_storeu_ps(out + d, _mm256_mul_ps(acc, _mm256_set1_ps(inv)));
  }
}

// attend_one for G query heads that read the same KV head (grouped-query attention), with AVX-512:
// each key and value is loaded once for the G heads, q and the G x D sums stay in registers, and no
// chain runs from one key to the next in the scores pass (attend_one's running maximum did), so
// keys overlap in the core. q: G rows of D = 16 C floats; scores: room for G * seen floats; out: G
// rows of D. A generation step's attention (SmolLM2, 3 heads per KV head, 100 keys): 20 -> 4 us.
template <int G, int C>
__attribute__((target("avx512f,avx2,fma"))) void attend_group(const float* q, const float* keys,
                                                                      const float* values, int64_t stride,
                                                                      int64_t seen, float scale, float* scores,
                                                                      float* out) {
  constexpr int D = 16 * C;
  __m512 qv[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * D + 16 * c);
  for (int64_t j = 0; j < seen; ++j) {
    const float* k = keys + j * stride;
    __m512 kv[C];
    for (int c = 0; c < C; ++c) kv[c] = _mm512_loadu_ps(k + 16 * c);
    for (int g = 0; g < G; ++g) {
      __m512 a = _mm512_mul_ps(qv[g][0], kv[0]);
      for (int c = 1; c < C; ++c) a = _mm512_fmadd_ps(qv[g][c], kv[c], a);
      scores[g * seen + j] = _mm512_reduce_add_ps(a) * scale;
    }
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    float* s = scores + g * seen;
    __m512 top16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t j = 0;
    for (; j + 16 <= seen; j += 16) top16 = _mm512_max_ps(top16, _mm512_loadu_ps(s + j));
    float top = _mm512_reduce_max_ps(top16);
    for (; j < seen; ++j) top = std::max(top, s[j]);
    inv[g] = exponentiate(s, seen, top);
  }
  __m512 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < seen; ++j) {
    const float* v = values + j * stride;
    __m512 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = _mm512_loadu_ps(v + 16 * c);
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(scores[g * seen + j]);
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(s, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv[g])));
}

using Group = void (*)(const float*, const float*, const float*, int64_t, int64_t, float, float*, float*);

// The most query heads attend_group takes at once for head size D (its q and sums fill 16 registers
// each), 0 where it does not apply (D not 32, 64 or 128; no AVX-512).
inline int group_limit(int64_t D) {
  if (!tpserve_simd::use_avx512()) return 0;
  return D == 32 || D == 64 ? 4 : D == 128 ? 2 : 0;
}

inline Group group_kernel(int heads, int64_t D) {
  static constexpr Group k32[4] = {attend_group<1, 2>, attend_group<2, 2>, attend_group<3, 2>, attend_group<4, 2>};
  static constexpr Group k64[4] = {attend_group<1, 4>, attend_group<2, 4>, attend_group<3, 4>, attend_group<4, 4>};
  static constexpr Group k128[2] = {attend_group<1, 8>, attend_group<2, 8>};
  return D == 32 ? k32[heads - 1] : D == 64 ? k64[heads - 1] : k128[heads - 1];
}

}  // namespace tpserve_attend
