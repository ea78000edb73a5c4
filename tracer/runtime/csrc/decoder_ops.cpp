// tpserve::rms_norm, tpserve::rope and tpserve::cached_attention: a decoder layer's RMS normalisation,
// rotary embedding and a generation step's attention over the KV cache as one op each instead of 6, 7
// and ~12 ATen ops. A generation step runs ~60, ~60 and 30 of them on a few hundred numbers each,
// where dispatching the small ops, not the arithmetic, is the cost. Other dtypes, devices and shapes
// take the same formulas in ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attend.h"
#include "simd.h"

namespace {

// Sum of a row's squares in double: 8 at a time over two 4-lane accumulators (one chain of scalar
// double adds was latency-bound: 40 rows of 576 took ~30 us, 61 norms per SmolLM2 prompt).
__attribute__((target("avx2,fma"))) double sum_of_squares(const float* row, int64_t D) {
  __m256d a = _mm256_setzero_pd(), b = _mm256_setzero_pd();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    const __m256d lo = _mm256_cvtps_pd(_mm_loadu_ps(row + d)), hi = _mm256_cvtps_pd(_mm_loadu_ps(row + d + 4));
    a = _mm256_fmadd_pd(lo, lo, a);
    b = _mm256_fmadd_pd(hi, hi, b);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(a, b));
  double squares = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; d < D; ++d) squares += static_cast<double>(row[d]) * row[d];
  return squares;
}

// weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension (Llama's RMSNorm, in fp32).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t D = x.size(-1);
  if (!x.device().is_cpu() || x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat ||
      weight.numel() != D || x.requires_grad())
    return weight * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx2 = tpserve_simd::cpu_has_avx2_fma();
  for (int64_t r = 0; r < xc.numel() / D; ++r) {
    const float* row = xp + r * D;
    double squares = 0.0;
    if (avx2) {
      squares = sum_of_squares(row, D);
    } else {
      for (int64_t d = 0; d < D; ++d) squares += static_cast<double>(row[d]) * row[d];
    }
    const float inv = 1.0f / std::sqrt(static_cast<float>(squares / D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) yp[r * D + d] = wp[d] * (row[d] * inv);
  }
  return y;
}

// x * cos + rotate_half(x) * sin for x [b, L, heads, D] and cos, sin [b, L, 1, D] (one angle set per
// token, shared by its heads); rotate_half(x) = cat(-x[D/2:], x[:D/2]).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const bool fast = x.device().is_cpu() && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat && x.dim() == 4 && x.size(-1) % 2 == 0 &&
                    cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(0) == x.size(0) &&
                    cos.size(1) == x.size(1) && cos.size(2) == 1 && cos.size(3) == x.size(3) && !x.requires_grad();
  if (!fast) {
    const int64_t half = x.size(-1) / 2;
    return x * cos + at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1) * sin;
  }
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t tokens = x.size(0) * x.size(1), heads = x.size(2), D = x.size(3), half = D / 2;
  const float *xp = xc.data_ptr<float>(), *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    const float *c = cp + t * D, *s = sp + t * D;
    for (int64_t h = 0; h < heads; ++h) {
      const float* v = xp + (t * heads + h) * D;
      float* out = yp + (t * heads + h) * D;
      for (int64_t d = 0; d < half; ++d) out[d] = v[d] * c[d] - v[d + half] * s[d];
      for (int64_t d = half; d < D; ++d) out[d] = v[d] * c[d] + v[d - half] * s[d];
    }
  }
  return y;
}

// The new keys and values k, v [b, L, KV, D] written in place at cache_k/v[slots[i], positions[i, l]],
// then softmax(q k^T * scale) v for each query token over the first `context` positions of its cache
// row, causal by position (key j is seen by a token at position p when j <= p): q [b, L, H, D], caches
// [rows, max_context, KV, D], slots [b] (the cache row of each of q's rows), positions [b, L],
// kv_index [H] (the KV head each query head reads). Returns [b, L, H, D]. The caches are read where
// they lie: no gathered copy of the rows, no mask tensor, no transposes.
at::Tensor attention_formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
                             at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& positions,
                             const at::Tensor& kv_index, int64_t context, double scale) {
  const at::Tensor rows = slots.unsqueeze(1).expand(positions.sizes());
  cache_k.index_put_({rows, positions}, k);
  cache_v.index_put_({rows, positions}, v);
  const at::Tensor keys = cache_k.index_select(0, slots).narrow(1, 0, context).index_select(2, kv_index);
  const at::Tensor values = cache_v.index_select(0, slots).narrow(1, 0, context).index_select(2, kv_index);
  at::Tensor scores = at::einsum("blhd,bchd->bhlc", {q, keys}) * scale;
  const at::Tensor seen = at::arange(context, positions.options()).view({1, 1, -1}) <= positions.unsqueeze(-1);
  scores = scores.masked_fill(seen.logical_not().unsqueeze(1), -std::numeric_limits<float>::infinity());
  return at::einsum("bhlc,bchd->blhd", {at::softmax(scores, -1), values});
}

at::Tensor cached_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
                            at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& positions,
                            const at::Tensor& kv_index, int64_t context, double scale) {
  const bool fast = q.device().is_cpu() && q.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat &&
                    cache_v.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && q.dim() == 4 && cache_k.dim() == 4 &&
                    cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() && cache_v.is_contiguous() &&
                    q.size(3) == cache_k.size(3) && q.size(3) % 8 == 0 && context <= cache_k.size(1) &&
                    k.sizes() == v.sizes() && k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                    k.size(2) == cache_k.size(2) && k.size(3) == q.size(3) && slots.numel() == q.size(0) &&
                    positions.sizes() == q.sizes().slice(0, 2) && kv_index.numel() == q.size(2) &&
                    !q.requires_grad() && tpserve_simd::cpu_has_avx2_fma();
  if (!fast) return attention_formula(q, k, v, cache_k, cache_v, slots, positions, kv_index, context, scale);
  const at::Tensor qc = q.contiguous(), kc_new = k.contiguous(), vc_new = v.contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const at::Tensor kvi = kv_index.to(at::kLong).contiguous();
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t rows = cache_k.size(0), C = cache_k.size(1), KV = cache_k.size(2);
  const int64_t *sp = sl.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>(), *kp = kvi.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < rows, "cached_attention: slot out of range");
  for (int64_t i = 0; i < B * L; ++i) TORCH_CHECK(pp[i] >= 0 && pp[i] < C, "cached_attention: position out of range");
  for (int64_t h = 0; h < H; ++h) TORCH_CHECK(kp[h] >= 0 && kp[h] < KV, "cached_attention: kv_index out of range");
  // the new tokens' keys and values into their cache rows: O(new tokens)
  float *kc = cache_k.data_ptr<float>(), *vc = cache_v.data_ptr<float>();
  const float *kn = kc_new.data_ptr<float>(), *vn = vc_new.data_ptr<float>();
  for (int64_t i = 0; i < B * L; ++i) {
    const int64_t at = (sp[i / L] * C + pp[i]) * KV * D;
    std::copy_n(kn + i * KV * D, KV * D, kc + at);
    std::copy_n(vn + i * KV * D, KV * D, vc + at);
  }
  at::Tensor out = at::empty_like(qc);
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = KV * D;
  // one task per (row, token, head); a task reads at most `context` keys and values of D floats
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, context * D));
  at::parallel_for(0, B * L * H, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(context);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t token = t / H, h = t % H, row = token / L;
      // positions are checked >= 0 above, so every token sees at least key 0; all `context` keys at
      // or past the window's end
      const int64_t seen = std::min<int64_t>(context, pp[token] + 1);
      const int64_t base = sp[row] * C * stride + kp[h] * D;
      tpserve_attend::attend_one(qp + t * D, kc + base, vc + base, stride, seen, D, static_cast<float>(scale), scores.data(),
                 op + t * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("cached_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, "
        "Tensor positions, Tensor kv_index, int context, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm));
  m.impl("rope", TORCH_FN(rope));
  m.impl("cached_attention", TORCH_FN(cached_attention));
}
