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
  float total = 0.0f;
  for (int64_t j = 0; j < seen; ++j) total += (scores[j] = std::exp(scores[j] - top));
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
