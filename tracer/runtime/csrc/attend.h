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

// out[D] = softmax(q . keys[j] * scale over j < seen) . values; keys[j] at keys + j * stride (floats),
// values likewise; scores: room for `seen` floats.
inline __attribute__((target("avx2,fma"))) void attend_one(const float* q, const float* keys, const float* values,
                                                    int64_t stride, int64_t seen, int64_t D, float scale,
                                                    float* scores, float* out) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < seen; ++j) {
    const float* k = keys + j * stride;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    scores[j] = tpserve_simd::horizontal_sum(acc) * scale;
    top = std::max(top, scores[j]);
  }
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
  const float inv = 1.0f / total;
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

}  // namespace tpserve_attend
