// tpserve::rms_norm, tpserve::rope, tpserve::cached_attention and tpserve::swiglu / geglu: a decoder layer's RMS
// normalisation, rotary embedding, attention over the KV cache (with q/k rotation and the cache write)
// and gated activation as one op each instead of 6, 7, ~15 and 3 ATen ops. A generation step runs 60,
// 30 and 30 of them on a few hundred numbers each, where dispatching the small ops, not the arithmetic,
// is the cost. Other dtypes, devices and shapes take the same formulas in ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
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

// Llama's rotary embedding of one head's D values (rope's formula): out = x * cos + rotate_half(x) * sin
// over its first R values (cos, sin: R each; R = D but for a partial rotary, Phi-3's), the rest copied.
inline void rotate(const float* x, const float* c, const float* s, int64_t R, int64_t D, float* out) {
  const int64_t half = R / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * c[d] - x[d + half] * s[d];
  for (int64_t d = half; d < R; ++d) out[d] = x[d] * c[d] + x[d - half] * s[d];
  std::copy(x + R, x + D, out + R);
}

// rope's formula in ATen ops, over x's first cos.size(-1) values.
at::Tensor rope_formula(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t R = cos.size(-1), half = R / 2;
  const at::Tensor turned = x.narrow(-1, 0, R);
  const at::Tensor rotated = turned * cos + at::cat({-turned.narrow(-1, half, half), turned.narrow(-1, 0, half)}, -1) * sin;
  return R == x.size(-1) ? rotated : at::cat({rotated, x.narrow(-1, R, x.size(-1) - R)}, -1);
}

// x * cos + rotate_half(x) * sin for x [b, L, heads, D] and cos, sin [b, L, 1, R] (one angle set per
// token, shared by its heads; R <= D: only the first R values turn); rotate_half(x) = cat(-x[R/2:R], x[:R/2]).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const bool fast = x.device().is_cpu() && x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat && x.dim() == 4 && cos.size(-1) % 2 == 0 &&
                    cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(0) == x.size(0) &&
                    cos.size(1) == x.size(1) && cos.size(2) == 1 && cos.size(3) <= x.size(3) && !x.requires_grad();
  if (!fast) return rope_formula(x, cos, sin);
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t tokens = x.size(0) * x.size(1), heads = x.size(2), D = x.size(3), R = cos.size(3);
  const float *xp = xc.data_ptr<float>(), *cp = cc.data_ptr<float>(), *sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h)
      rotate(xp + (t * heads + h) * D, cp + t * R, sp + t * R, R, D, yp + (t * heads + h) * D);
  return y;
}

// One head's D values RMS-normalized (a QK-norm: Qwen3's, Gemma 3's) into out; weight null: copied.
inline void head_norm(const float* x, const float* weight, float eps, int64_t D, float* out) {
  if (weight == nullptr) {
    std::copy_n(x, D, out);
    return;
  }
  double squares = 0.0;
  for (int64_t d = 0; d < D; ++d) squares += static_cast<double>(x[d]) * x[d];
  const float inv = 1.0f / std::sqrt(static_cast<float>(squares / D) + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = weight[d] * (x[d] * inv);
}

// attention_formula's cache write and attention where a sliding layer's cache is a ring (see
// cached_attention): position p at index p % ring, the first window - 1 indices mirrored past the ring;
// each query gathers the keys of its window's positions.
at::Tensor ring_formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& cache_k,
                        at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& rows, const at::Tensor& positions,
                        const at::Tensor& kv_index, int64_t context, double scale, int64_t window, int64_t ring) {
  const at::Tensor index = positions.remainder(ring);
  cache_k.transpose(1, 2).index_put_({rows, index}, k);
  cache_v.transpose(1, 2).index_put_({rows, index}, v);
  const at::Tensor mirrored = index < window - 1;
  cache_k.transpose(1, 2).index_put_({rows.index({mirrored}), index.index({mirrored}) + ring}, k.index({mirrored}));
  cache_v.transpose(1, 2).index_put_({rows.index({mirrored}), index.index({mirrored}) + ring}, v.index({mirrored}));
  const at::Tensor key = positions.unsqueeze(-1) + (at::arange(window, positions.options()) - (window - 1));  // [b, L, W]
  const at::Tensor batch = at::arange(slots.size(0), positions.options()).view({-1, 1, 1}).expand(key.sizes());
  const auto window_of = [&](const at::Tensor& cache) {  // [b, L, W, H, D]
    return cache.index_select(0, slots).transpose(1, 2).index({batch, key.clamp_min(0).remainder(ring)})
        .index_select(3, kv_index);
  };
  at::Tensor scores = at::einsum("blhd,blwhd->bhlw", {q, window_of(cache_k)}) * scale;
  const at::Tensor seen = (key >= 0).logical_and(key < context);
  scores = scores.masked_fill(seen.logical_not().unsqueeze(1), -std::numeric_limits<float>::infinity());
  return at::einsum("bhlw,blwhd->blhd", {at::softmax(scores, -1), window_of(cache_v)}).flatten(-2);
}

// cached_attention's formula in ATen ops (other dtypes and devices).
at::Tensor attention_formula(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k,
                             at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& positions,
                             const at::Tensor& kv_index, int64_t context, double scale, int64_t window,
                             const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                             double eps, int64_t ring) {
  const int64_t H = kv_index.numel(), KV = cache_k.size(1), D = cache_k.size(3);
  const std::vector<at::Tensor> parts = qkv.split_with_sizes({H * D, KV * D, KV * D}, -1);
  const auto normed = [&](const at::Tensor& x, const std::optional<at::Tensor>& w) {
    return w ? *w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps)) : x;
  };
  const at::Tensor q = rope(normed(parts[0].unflatten(-1, {H, D}), q_norm), cos, sin);
  const at::Tensor k = rope(normed(parts[1].unflatten(-1, {KV, D}), k_norm), cos, sin);
  const at::Tensor v = parts[2].unflatten(-1, {KV, D});
  const at::Tensor rows = slots.unsqueeze(1).expand(positions.sizes());
  if (ring > 0) return ring_formula(q, k, v, cache_k, cache_v, slots, rows, positions, kv_index, context, scale, window, ring);
  cache_k.transpose(1, 2).index_put_({rows, positions}, k);
  cache_v.transpose(1, 2).index_put_({rows, positions}, v);
  const at::Tensor keys = cache_k.index_select(0, slots).narrow(2, 0, context).index_select(1, kv_index);
  const at::Tensor values = cache_v.index_select(0, slots).narrow(2, 0, context).index_select(1, kv_index);
  at::Tensor scores = at::einsum("blhd,bhcd->bhlc", {q, keys}) * scale;
  const at::Tensor key = at::arange(context, positions.options()).view({1, 1, -1});
  at::Tensor seen = key <= positions.unsqueeze(-1);
  if (window > 0) seen = seen.logical_and(key > positions.unsqueeze(-1) - window);
  scores = scores.masked_fill(seen.logical_not().unsqueeze(1), -std::numeric_limits<float>::infinity());
  return at::einsum("bhlc,bhcd->blhd", {at::softmax(scores, -1), values}).flatten(-2);
}

// qkv [b, L, (H + 2 KV) D]: one fused projection's q, k and v for each of b rows' L new tokens. Normalizes
// each head of q and k where q_norm / k_norm [D] are given (QK-norm), rotates them (rope's cos, sin
// [b, L, 1, R]: the first R of D values turn), writes the rotated keys and the values in place at
// cache_k/v[slots[i], positions[i, l]], then returns softmax(q k^T * scale) v [b, L, H D] for each query
// token over the first `context` positions of its cache row, causal by position (key j is seen by a
// token at position p when j <= p, and, with a window W > 0, p - W < j: a sliding-window layer):
// caches [rows, KV, max_context, D], slots [b] (the cache row of each of qkv's rows), positions [b, L],
// kv_index [H] (the KV head each query head reads). One op for what took a split, two rotations, a
// cache write, a gather of the rows, a mask and SDPA; the caches are read where they lie.
// ring > 0 (a sliding layer, window W): the caches are [rows, KV, ring + W - 1, D], position p at index
// p % ring and, for indices below W - 1, at ring + p % ring too, so that a query's window (at most W
// positions from lo % ring on) is always one run of indices; ring >= W + L - 1 keeps a call's own writes
// (padding included) from overwriting keys its queries still read.
at::Tensor cached_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k,
                            at::Tensor& cache_v, const at::Tensor& slots, const at::Tensor& positions,
                            const at::Tensor& kv_index, int64_t context, double scale, int64_t window,
                            const std::optional<at::Tensor>& q_norm, const std::optional<at::Tensor>& k_norm,
                            double eps, int64_t ring) {
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(), "cached_attention: caches [rows, KV, context, D]");
  const int64_t H = kv_index.numel(), KV = cache_k.size(1), D = cache_k.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(-1) == (H + 2 * KV) * D, "cached_attention: qkv must be [b, L, ",
              (H + 2 * KV) * D, "] for ", H, " heads and ", KV, " KV heads of ", D);
  const int64_t B = qkv.size(0), L = qkv.size(1), R = cos.size(-1);
  TORCH_CHECK(ring == 0 || (window > 0 && ring >= window + L - 1 && cache_k.size(2) == ring + window - 1),
              "cached_attention: a ring of ", ring, " needs a window, room for the window and ", L,
              " new tokens, and caches of ring + window - 1 positions");
  const auto norm_ok = [&](const std::optional<at::Tensor>& w) {
    return !w || (w->scalar_type() == at::kFloat && w->numel() == D && w->is_contiguous());
  };
  const bool fast = qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat &&
                    cache_v.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat && R <= D && R % 2 == 0 && cos.numel() == B * L * R &&
                    sin.numel() == B * L * R && norm_ok(q_norm) && norm_ok(k_norm) &&
                    cache_k.is_contiguous() && cache_v.is_contiguous() && D % 8 == 0 && (ring > 0 || context <= cache_k.size(2)) &&
                    slots.numel() == B && positions.sizes() == qkv.sizes().slice(0, 2) && !qkv.requires_grad() &&
                    tpserve_simd::cpu_has_avx2_fma();
  if (!fast)
    return attention_formula(qkv, cos, sin, cache_k, cache_v, slots, positions, kv_index, context, scale, window, q_norm,
                             k_norm, eps, ring);
  const float* qw = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kw = k_norm ? k_norm->data_ptr<float>() : nullptr;
  const at::Tensor x = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  const at::Tensor sl = slots.to(at::kLong).contiguous(), pos = positions.to(at::kLong).contiguous();
  const at::Tensor kvi = kv_index.to(at::kLong).contiguous();
  const int64_t rows = cache_k.size(0), C = cache_k.size(2), width = (H + 2 * KV) * D;
  const int64_t *sp = sl.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>(), *kp = kvi.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < rows, "cached_attention: slot out of range");
  for (int64_t i = 0; i < B * L; ++i) TORCH_CHECK(pp[i] >= 0 && (ring > 0 || pp[i] < C), "cached_attention: position out of range");
  for (int64_t h = 0; h < H; ++h) TORCH_CHECK(kp[h] >= 0 && kp[h] < KV, "cached_attention: kv_index out of range");
  const float *xp = x.data_ptr<float>(), *cp = cc.data_ptr<float>(), *snp = sc.data_ptr<float>();
  // the new tokens' keys (rotated) and values into their cache rows: O(new tokens)
  float *kc = cache_k.data_ptr<float>(), *vc = cache_v.data_ptr<float>();
  std::vector<float> normed(D);
  for (int64_t i = 0; i < B * L; ++i) {
    const float* token = xp + i * width;
    for (int64_t h = 0; h < KV; ++h) {
      const int64_t index = ring > 0 ? pp[i] % ring : pp[i], at = ((sp[i / L] * KV + h) * C + index) * D;
      head_norm(token + (H + h) * D, kw, static_cast<float>(eps), D, normed.data());
      rotate(normed.data(), cp + i * R, snp + i * R, R, D, kc + at);
      std::copy_n(token + (H + KV + h) * D, D, vc + at);
      if (ring > 0 && index < window - 1) {  // the mirror past the ring
        std::copy_n(kc + at, D, kc + at + ring * D);
        std::copy_n(vc + at, D, vc + at + ring * D);
      }
    }
  }
  // Threads only where the work outweighs waking them: under ~4k (key, head) pairs (SmolLM2: a lone
  // row's step in a context bucket of up to 256) one thread does it all. Tasks: one per (row, token,
  // run of consecutive query heads on one KV head: SmolLM2's 3), attended together where AVX-512
  // allows, or one per query head when too few runs would leave a thread idle (a lone row's step at
  // a long context: memory-bound there, each thread reading its heads' keys; at bucket 1024 one
  // thread took twice as long).
  const int64_t span = window > 0 ? std::min(context, window) : context;  // keys a query reads at most
  const int64_t work = B * L * H * span;
  const bool parallel = work >= 4096 && at::get_num_threads() > 1;
  const int most = tpserve_attend::group_limit(D);  // 0: one head at a time (attend_one)
  const bool grouped = most > 0;
  int limit = std::max(1, most);
  const auto group_runs = [&] {
    std::vector<std::pair<int64_t, int>> runs;  // (first head, heads)
    for (int64_t h = 0; h < H; ++h) {
      if (!runs.empty() && kp[h] == kp[runs.back().first] && runs.back().first + runs.back().second == h &&
          runs.back().second < limit)
        ++runs.back().second;
      else
        runs.emplace_back(h, 1);
    }
    return runs;
  };
  std::vector<std::pair<int64_t, int>> runs = group_runs();
  if (parallel && B * L * static_cast<int64_t>(runs.size()) < 2 * at::get_num_threads()) {
    limit = 1;
    runs = group_runs();
  }
  at::Tensor out = at::empty({B, L, H * D}, x.options());
  float* op = out.data_ptr<float>();
  const int64_t tasks = B * L * static_cast<int64_t>(runs.size());
  const int64_t grain = parallel ? 1 : tasks;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(limit) * span), q(static_cast<size_t>(limit) * D), n(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t token = t / static_cast<int64_t>(runs.size()), row = token / L;
      const auto [first, heads] = runs[t % runs.size()];
      for (int g = 0; g < heads; ++g) {
        head_norm(xp + token * width + (first + g) * D, qw, static_cast<float>(eps), D, n.data());
        rotate(n.data(), cp + token * R, snp + token * R, R, D, q.data() + g * D);
      }
      // positions are checked >= 0 above, so every token sees at least its own key; keys lo .. seen - 1
      // (all `context` keys at or past the window's end; a sliding layer's last W)
      const int64_t seen = std::min<int64_t>(context, pp[token] + 1);
      const int64_t lo = window > 0 ? std::min(seen - 1, std::max<int64_t>(0, pp[token] - window + 1)) : 0;
      const int64_t first_key = ring > 0 ? lo % ring : lo;  // then one run of indices (the mirror)
      const int64_t base = (sp[row] * KV + kp[first]) * C * D + first_key * D;  // the KV head's keys, one after another
      float* dst = op + token * H * D + first * D;
      if (grouped) {
        tpserve_attend::group_kernel(heads, D)(q.data(), kc + base, vc + base, D, seen - lo, static_cast<float>(scale),
                                               scores.data(), dst);
      } else {
        for (int g = 0; g < heads; ++g)
          tpserve_attend::attend_one(q.data() + g * D, kc + base, vc + base, D, seen - lo, D,
                                     static_cast<float>(scale), scores.data(), dst + g * D);
      }
    }
  });
  return out;
}

// silu(gate) * up for gate_up [..., 2 I], a fused gate / up projection's output: [..., I]. One op for
// a split, a SiLU and a product (with exp8's e^x: relative error ~1e-7, as ATen's vectorized SiLU).
__attribute__((target("avx2,fma"))) void swiglu_rows(const float* x, int64_t rows, int64_t I, float* y) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps(), limit = _mm256_set1_ps(88.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const float *gate = x + r * 2 * I, *up = gate + I;
    float* out = y + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      // e^-g with -g <= 88 (exp8 is exact in form for positive x up to there): beyond, silu(g) is -0
      const __m256 e = tpserve_attend::exp8(_mm256_min_ps(_mm256_sub_ps(zero, g), limit));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < I; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

// gelu_tanh(gate) * up (Gemma's GeGLU) for gate_up [..., 2 I]: [..., I], one op for a split, a tanh-GELU
// and a product; gelu_tanh(x) = x / (1 + e^(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), as
// 0.5 x (1 + tanh(u)) (the same to ~1e-7).
__attribute__((target("avx2,fma"))) void geglu_rows(const float* x, int64_t rows, int64_t I, float* y) {
  const __m256 one = _mm256_set1_ps(1.0f), limit = _mm256_set1_ps(88.0f);
  const __m256 k = _mm256_set1_ps(-2.0f * 0.7978845608028654f), cube = _mm256_set1_ps(0.044715f);
  for (int64_t r = 0; r < rows; ++r) {
    const float *gate = x + r * 2 * I, *up = gate + I;
    float* out = y + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 u = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(cube, g), _mm256_mul_ps(g, g), g));  // -2u
      const __m256 e = tpserve_attend::exp8(_mm256_min_ps(u, limit));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < I; ++i) {
      const float g = gate[i], u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
      out[i] = 0.5f * g * (1.0f + std::tanh(u)) * up[i];
    }
  }
}

at::Tensor gated(const at::Tensor& gate_up, bool gelu) {
  const int64_t I = gate_up.size(-1) / 2;
  if (!gate_up.device().is_cpu() || gate_up.scalar_type() != at::kFloat || gate_up.size(-1) % 2 ||
      gate_up.requires_grad() || !tpserve_simd::cpu_has_avx2_fma()) {
    const std::vector<at::Tensor> parts = gate_up.chunk(2, -1);
    return (gelu ? at::gelu(parts[0], "tanh") : at::silu(parts[0])) * parts[1];
  }
  const at::Tensor x = gate_up.contiguous();
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = I;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t rows = x.numel() / std::max<int64_t>(1, 2 * I);
  // prompts: rows split over the threads (a generation step's few rows stay on one)
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, I)), [&](int64_t begin, int64_t end) {
    (gelu ? geglu_rows : swiglu_rows)(x.data_ptr<float>() + begin * 2 * I, end - begin, I, y.data_ptr<float>() + begin * I);
  });
  return y;
}

at::Tensor geglu(const at::Tensor& gate_up) { return gated(gate_up, true); }

at::Tensor swiglu(const at::Tensor& gate_up) { return gated(gate_up, false); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("geglu(Tensor gate_up) -> Tensor");
  m.def("cached_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor slots, "
        "Tensor positions, Tensor kv_index, int context, float scale, int window=-1, Tensor? q_norm=None, "
        "Tensor? k_norm=None, float eps=1e-6, int ring=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm));
  m.impl("rope", TORCH_FN(rope));
  m.impl("swiglu", TORCH_FN(swiglu));
  m.impl("geglu", TORCH_FN(geglu));
  m.impl("cached_attention", TORCH_FN(cached_attention));
}
