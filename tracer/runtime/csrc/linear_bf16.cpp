// tpserve::linear_bf16: y = x W^T + b with bfloat16 weights (an encoder built with --weights bf16): x rounded to
// bfloat16, one bfloat16 GEMM, the output back in x's dtype with the bias added there. ATen hands the GEMM to oneDNN,
// which runs it on AMX tiles or AVX-512 BF16 where the CPU has them (measured on the Xeon with AMX, 2 threads: MiniLM's
// linears at 400 rows 3.1x fp32's rate, at 16 rows 1.7x) and converts on other CPUs (correct, not faster).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "simd.h"

namespace {

// rows: as tpserve::linear's (only x's first `rows` rows are real; the padding rows' outputs are zeros).
// The GEMM runs over all of x's rows all the same: oneDNN builds a kernel per shape (measured 1.2-3.5 ms
// the first time, 0.1-0.5 ms after), so shapes are the buckets', warmed up, not each batch's token count.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "tpserve::linear_bf16: weight must be bfloat16 [N, K]");
  TORCH_CHECK(x.size(-1) == weight.size(1), "tpserve::linear_bf16: x has ", x.size(-1), " features, the weights ",
              weight.size(1));
  const int64_t used = tpserve_simd::used_rows(x, rows), N = weight.size(0);
  at::Tensor y = at::linear(x.to(at::kBFloat16), weight).to(x.scalar_type());
  if (bias) y.add_(*bias);
  const at::Tensor flat = y.view({-1, N});
  if (used < flat.size(0)) flat.narrow(0, used, flat.size(0) - used).zero_();
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias=None, Tensor? rows=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) { m.impl("linear_bf16", TORCH_FN(linear_bf16)); }
