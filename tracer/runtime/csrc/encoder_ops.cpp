// tpserve::packed_attention: an encoder's self-attention over texts packed end to end into one
// sequence (no padding), each text attending only to its own tokens. A batch of mixed-length texts
// then runs its linear layers on exactly its tokens, as one GEMM, instead of rows padded to a bucket;
// this op keeps the texts apart. What differs between encoder families is here too: a window of keys
// around each token (ModernBERT's local layers; causal for a decoder used as an embedder), a bias per
// relative position (MPNet) and key/value heads shared by several query heads (grouped-query
// attention). Other dtypes and devices take the same formula in ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include <immintrin.h>

#include <limits>

#include "attend.h"
#include "simd.h"

namespace {

// The same with ATen ops: tokens grouped by the text they lie in (tokens past offsets[R] in a group of
// their own), attention masked to the group and the window, the bias added, those past offsets[R] zeroed.
at::Tensor packed_attention_formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& offsets, double scale, int64_t left, int64_t right,
                                    const std::optional<at::Tensor>& bias) {
  const at::Tensor token = at::arange(q.size(0), offsets.options());
  const at::Tensor group = at::searchsorted(offsets, token, /*out_int32=*/false, /*right=*/true) - 1;
  const at::Tensor distance = token.unsqueeze(0) - token.unsqueeze(1);  // [t, s]: s - t
  at::Tensor allowed = group.unsqueeze(0) == group.unsqueeze(1);
  if (left >= 0) allowed = allowed & (distance >= -left);
  if (right >= 0) allowed = allowed & (distance <= right);
  const int64_t per_kv = q.size(1) / k.size(1);
  const at::Tensor keys = k.repeat_interleave(per_kv, 1), values = v.repeat_interleave(per_kv, 1);
  at::Tensor scores = at::einsum("thd,shd->hts", {q, keys}) * scale;
  if (bias) {
    const int64_t most = (bias->size(1) - 1) / 2;
    scores = scores + bias->to(scores.scalar_type()).index_select(1, (distance.clamp(-most, most) + most).flatten())
                          .view({bias->size(0), q.size(0), q.size(0)});
  }
  scores = scores.masked_fill(allowed.logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  const at::Tensor out = at::einsum("hts,shd->thd", {at::softmax(scores, -1), values});
  return out * (token < offsets[-1]).to(out.scalar_type()).view({-1, 1, 1});
}

// One query's attention over keys lo .. hi - 1 of its text, with AVX-512: `keys` holds the text's keys
// transposed ([D] rows of `width` floats, room for 64 past the last), so its scores build up 16 keys at
// a time over D multiply-adds with no horizontal sum (the one-query-at-a-time kernel spent most of its
// time in those); four blocks of 16 keys at once and the values' sums split by even and odd keys, so
// that independent multiply-adds overlap instead of waiting on each other's latency. Then softmax
// (+ bias: hi - lo floats) and the values [n] rows (stride floats apart) weighed. Head size D = 16 C.
template <int C>
__attribute__((target("avx512f,avx2,fma"))) void attend_columns(const float* q, const float* keys, int64_t width,
                                                                const float* values, int64_t stride, int64_t lo,
                                                                int64_t hi, float scale, const float* bias,
                                                                float* scores, float* out) {
  constexpr int64_t D = 16 * C;
  const int64_t seen = hi - lo;
  const __m512 scale16 = _mm512_set1_ps(scale);
  __m512 top16 = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = lo; j < hi; j += 64) {
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t d = 0; d < D; ++d) {
      const __m512 qd = _mm512_set1_ps(q[d]);
      const float* row = keys + d * width + j;
      for (int b = 0; b < 4; ++b) acc[b] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(row + 16 * b), acc[b]);
    }
    for (int b = 0; b < 4 && j + 16 * b < hi; ++b) {
      const int64_t at = j + 16 * b;
      const __mmask16 valid = static_cast<__mmask16>(hi - at >= 16 ? 0xFFFF : (1u << (hi - at)) - 1);
      __m512 x = _mm512_mul_ps(acc[b], scale16);
      if (bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(valid, bias + (at - lo)));
      _mm512_mask_storeu_ps(scores + (at - lo), valid, x);
      top16 = _mm512_mask_max_ps(top16, valid, top16, x);
    }
  }
  const float inv = tpserve_attend::exponentiate(scores, seen, _mm512_reduce_max_ps(top16));
  // C vectors of 16 per value row; P sums of each, over keys j = p mod P: C x P chains in flight
  constexpr int P = C <= 2 ? 4 : C <= 4 ? 2 : 1;
  __m512 acc[P][C];
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < C; ++c) acc[p][c] = _mm512_setzero_ps();
  const float* v = values + lo * stride;
  int64_t j = 0;
  for (; j + P <= seen; j += P)
    for (int p = 0; p < P; ++p) {
      const __m512 weight = _mm512_set1_ps(scores[j + p]);
      for (int c = 0; c < C; ++c) acc[p][c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(v + (j + p) * stride + 16 * c), acc[p][c]);
    }
  for (; j < seen; ++j)
    for (int c = 0; c < C; ++c)
      acc[0][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[j]), _mm512_loadu_ps(v + j * stride + 16 * c), acc[0][c]);
  for (int c = 0; c < C; ++c) {
    __m512 sum = acc[0][c];
    for (int p = 1; p < P; ++p) sum = _mm512_add_ps(sum, acc[p][c]);
    _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(sum, _mm512_set1_ps(inv)));
  }
}

using Columns = void (*)(const float*, const float*, int64_t, const float*, int64_t, int64_t, int64_t, float,
                         const float*, float*, float*);

// attend_columns for head size D = 16 C (C = 1 .. 8), null for any other.
Columns columns_kernel(int64_t D) {
  static constexpr Columns kernels[8] = {attend_columns<1>, attend_columns<2>, attend_columns<3>, attend_columns<4>,
                                         attend_columns<5>, attend_columns<6>, attend_columns<7>, attend_columns<8>};
  return D % 16 == 0 && D >= 16 && D <= 128 ? kernels[D / 16 - 1] : nullptr;
}

// q [T, H, D], k and v [T, H / G, D] (query head h reads key/value head h / G); offsets [R + 1]: text r
// is tokens offsets[r] .. offsets[r + 1] - 1 (nondecreasing, offsets[0] = 0, offsets[R] <= T; an
// empty text is allowed). Token t attends to the tokens s of its own text with s >= t - left (left >= 0)
// and s <= t + right (right >= 0); -1: no limit on that side. bias [H, 2 M + 1]: added to the score of
// (t, s) for head h at bias[h, clamp(s - t, -M, M) + M]. Returns [T, H, D]: each token's
// softmax(q k^T * scale + bias) v over those keys; tokens past offsets[R] (the bucket's padding) 0.
at::Tensor packed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets,
                            double scale, int64_t left, int64_t right, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                  k.size(2) == q.size(2) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "packed_attention: q must be [tokens, heads, head_dim], k and v [tokens, kv_heads, head_dim] "
              "with kv_heads dividing heads");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "packed_attention: offsets must be [texts + 1]");
  TORCH_CHECK(!bias || (bias->dim() == 2 && bias->size(0) == q.size(1) && bias->size(1) % 2 == 1),
              "packed_attention: bias must be [heads, 2 M + 1]");
  const at::Tensor off = offsets.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), R = off.numel() - 1, G = q.size(1) / k.size(1);
  const int64_t* op = off.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[R] <= T, "packed_attention: offsets must run from 0 to at most ", T, " tokens");
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(op[r] <= op[r + 1], "packed_attention: offsets must not decrease");
  const bool fast = q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && D % 8 == 0 && !q.requires_grad() &&
                    tpserve_simd::cpu_has_avx2_fma();
  if (!fast) return packed_attention_formula(q, k, v, off.to(q.device()), scale, left, right, bias);
  // rows may lie apart (q, k, v split from one fused projection's output): read them where they are
  const auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous(); };
  const at::Tensor qc = rows(q);
  at::Tensor kc = rows(k), vc = rows(v);
  if (kc.stride(0) != vc.stride(0)) kc = k.contiguous(), vc = v.contiguous();
  const at::Tensor table = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t most = bias ? (table.size(1) - 1) / 2 : 0;
  const float* tp = bias ? table.data_ptr<float>() : nullptr;
  at::Tensor out = at::zeros({T, H, D}, q.options());
  float* outp = out.data_ptr<float>();
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  const int64_t q_stride = qc.stride(0), stride = kc.stride(0);
  std::vector<int64_t> text_length(R);
  for (int64_t r = 0; r < R; ++r) text_length[r] = op[r + 1] - op[r];
  const Columns columns = tpserve_simd::use_avx512() ? columns_kernel(D) : nullptr;
  if (columns != nullptr) {
    // A task: one head of one text (up to 128 of its queries); its keys transposed once, so that every
    // query's scores build up 16 keys at a time with no horizontal sums (attend_columns).
    struct Task { int64_t first, count, head, text; };
    std::vector<Task> tasks;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = op[r]; t < op[r + 1]; t += 128) tasks.push_back({t, std::min<int64_t>(128, op[r + 1] - t), h, r});
    const int64_t longest = R ? *std::max_element(text_length.begin(), text_length.end()) : 0;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> keys(D * (longest + 16) + 64), scores(longest + 64), added(bias ? longest : 0);
      for (int64_t i = begin; i < end; ++i) {
        const Task& task = tasks[i];
        const int64_t first = op[task.text], n = op[task.text + 1] - first, kv = (task.head / G) * D;
        const int64_t width = (n + 15) / 16 * 16;  // a row of the transposed keys, padded to whole vectors
        for (int64_t j = 0; j < n; ++j)
          for (int64_t d = 0; d < D; ++d) keys[d * width + j] = kp[(first + j) * stride + kv + d];
        for (int64_t t = task.first; t < task.first + task.count; ++t) {
          const int64_t lo = left >= 0 ? std::max<int64_t>(0, t - first - left) : 0;
          const int64_t hi = right >= 0 ? std::min<int64_t>(n, t - first + right + 1) : n;
          if (bias) {
            const float* row = tp + task.head * table.size(1) + most;
            for (int64_t j = lo; j < hi; ++j) added[j - lo] = row[std::clamp(first + j - t, -most, most)];
          }
          columns(qp + t * q_stride + task.head * D, keys.data(), width, vp + first * stride + kv, stride, lo, hi,
                  static_cast<float>(scale), bias ? added.data() : nullptr, scores.data(), outp + (t * H + task.head) * D);
        }
      }
    });
    return out;
  }
  std::vector<int64_t> text_of(op[R]);
  for (int64_t r = 0; r < R; ++r) std::fill(text_of.begin() + op[r], text_of.begin() + op[r + 1], r);
  // one task per (token, head); a task reads its text's keys and values inside the window
  at::parallel_for(0, op[R] * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T), added(bias ? T : 0);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t token = t / H, h = t % H;
      int64_t first = op[text_of[token]], last = op[text_of[token] + 1];
      if (left >= 0) first = std::max(first, token - left);
      if (right >= 0) last = std::min(last, token + right + 1);
      if (bias) {
        const float* row = tp + h * table.size(1) + most;
        for (int64_t s = first; s < last; ++s) added[s - first] = row[std::clamp(s - token, -most, most)];
      }
      const int64_t kv = (h / G) * D;
      tpserve_attend::attend_one(qp + token * q_stride + h * D, kp + first * stride + kv, vp + first * stride + kv,
                                 stride, last - first, D, static_cast<float>(scale), scores.data(), outp + t * D,
                                 bias ? added.data() : nullptr);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("packed_attention(Tensor q, Tensor k, Tensor v, Tensor offsets, float scale, int left=-1, int right=-1, "
        "Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("packed_attention", TORCH_FN(packed_attention));
}
