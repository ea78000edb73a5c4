// tpserve::packed_attention: an encoder's self-attention over texts packed end to end into one
// sequence (no padding), each text attending only to its own tokens. A batch of mixed-length texts
// then runs its linear layers on exactly its tokens, as one GEMM, instead of rows padded to a bucket;
// this op keeps the texts apart. Other dtypes and devices take the same formula in ATen ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "attend.h"
#include "simd.h"

namespace {

// The same with ATen ops: tokens grouped by the text they lie in (tokens past offsets[R] in a group of
// their own), attention masked to the group, those past offsets[R] zeroed.
at::Tensor packed_attention_formula(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& offsets, double scale) {
  const at::Tensor token = at::arange(q.size(0), offsets.options());
  const at::Tensor group = at::searchsorted(offsets, token, /*out_int32=*/false, /*right=*/true) - 1;
  const at::Tensor same = group.unsqueeze(0) == group.unsqueeze(1);
  at::Tensor scores = at::einsum("thd,shd->hts", {q, k}) * scale;
  scores = scores.masked_fill(same.logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  const at::Tensor out = at::einsum("hts,shd->thd", {at::softmax(scores, -1), v});
  return out * (token < offsets[-1]).to(out.scalar_type()).view({-1, 1, 1});
}

// q, k, v [T, H, D]; offsets [R + 1]: text r is tokens offsets[r] .. offsets[r + 1] - 1 (nondecreasing,
// offsets[0] = 0, offsets[R] <= T; an empty text is allowed). Returns [T, H, D]: each token's
// softmax(q k^T * scale) v over its own text's tokens; tokens past offsets[R] (the bucket's padding) 0.
at::Tensor packed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& offsets,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "packed_attention: q, k, v must be [tokens, heads, head_dim] alike");
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() >= 1, "packed_attention: offsets must be [texts + 1]");
  const at::Tensor off = offsets.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), R = off.numel() - 1;
  const int64_t* op = off.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[R] <= T, "packed_attention: offsets must run from 0 to at most ", T, " tokens");
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(op[r] <= op[r + 1], "packed_attention: offsets must not decrease");
  const bool fast = q.device().is_cpu() && q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                    v.scalar_type() == at::kFloat && D % 8 == 0 && !q.requires_grad() &&
                    tpserve_simd::cpu_has_avx2_fma();
  if (!fast) return packed_attention_formula(q, k, v, off.to(q.device()), scale);
  // rows may lie apart (q, k, v split from one fused projection's output): read them where they are
  const auto rows = [](const at::Tensor& t) { return t.stride(2) == 1 && t.stride(1) == t.size(2) ? t : t.contiguous(); };
  const at::Tensor qc = rows(q);
  at::Tensor kc = rows(k), vc = rows(v);
  if (kc.stride(0) != vc.stride(0)) kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::zeros({T, H, D}, q.options());
  std::vector<int64_t> text_of(op[R]);
  for (int64_t r = 0; r < R; ++r) std::fill(text_of.begin() + op[r], text_of.begin() + op[r + 1], r);
  const float *qp = qc.data_ptr<float>(), *kp = kc.data_ptr<float>(), *vp = vc.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const int64_t q_stride = qc.stride(0), stride = kc.stride(0);
  // one task per (token, head); a task reads its text's keys and values
  at::parallel_for(0, op[R] * H, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(T);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t token = t / H, h = t % H, first = op[text_of[token]], last = op[text_of[token] + 1];
      tpserve_attend::attend_one(qp + token * q_stride + h * D, kp + first * stride + h * D,
                                 vp + first * stride + h * D, stride, last - first, D, static_cast<float>(scale),
                                 scores.data(), outp + t * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("packed_attention(Tensor q, Tensor k, Tensor v, Tensor offsets, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("packed_attention", TORCH_FN(packed_attention));
}
