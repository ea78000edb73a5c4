// tpserve::rms_norm and tpserve::rope: a decoder layer's RMS normalisation and rotary embedding as
// one op each instead of 6 and 7 ATen ops. A generation step runs ~60 of each on a few hundred
// numbers, where dispatching the small ops, not the arithmetic, is the cost. Other dtypes, devices
// and shapes take the same formulas in ATen ops.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

namespace {

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
  for (int64_t r = 0; r < xc.numel() / D; ++r) {
    const float* row = xp + r * D;
    double squares = 0.0;
    for (int64_t d = 0; d < D; ++d) squares += static_cast<double>(row[d]) * row[d];
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("rms_norm", TORCH_FN(rms_norm));
  m.impl("rope", TORCH_FN(rope));
}
