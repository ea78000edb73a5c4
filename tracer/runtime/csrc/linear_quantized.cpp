// tpserve::linear_int8 and tpserve::linear_int4: y = x W^T + b with weights quantized in groups of 32
// along the input features, each group with its own float16 scale d and minimum m: w = d * q + m, q in
// 0..255 (int8) or 0..15 (int4: llama.cpp's Q4_1). A scale and a minimum per group hold the GGUF
// blocks exactly (Q4_0, Q4_1 as int4 or int8; Q8_0 as int8: d, m = -128 d) and, measured on SmolLM2,
// int8 in groups agreed with fp32 on 100 % of next tokens where one scale per output feature agreed
// on 96.5 %.
//
// qweight [N, K * bits / 8] uint8 and scale, minimum [N, K / 32] float16, in blocks of 16 weight rows
// (quantized_blocks.h): integer dot products against the inputs quantized to 16 bits per group (8 with input_bits=8: an
// encoder's output projections), for generation steps and prompts alike. Measured here (2 threads, SmolLM2's int4
// linears): 37 rows 23 ms where dequantizing tiles of weights for the fp32 kernel took 33, 512 rows 322 ms where
// dequantizing them for ATen's GEMM took 523. Other CPUs (no AVX2): the weights are dequantized for a GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "quantized_blocks.h"
#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kGroup = tpserve_blocks::kGroup;
constexpr int64_t kRowTile = 256;  // input rows per pass over the weights: their quantized values stay in L2
constexpr int64_t kBlockRows = tpserve_blocks::kBlockRows;

// The weights as fp32 [N, K] (quantized_blocks.h's blocks back to rows), for ATen's GEMM.
at::Tensor dequantize(const at::Tensor& qweight, const at::Tensor& scale, const at::Tensor& minimum, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "tpserve: weights are int8 or int4");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8 / bits, G = scale.size(1);
  const at::Tensor bytes = qweight.contiguous().view(-1), scales = scale.contiguous().view(-1),
                   minimums = minimum.contiguous().view(-1);
  std::vector<at::Tensor> parts;
  // rows [n0, n0 + blocks * rows) as `blocks` blocks of `rows` rows
  const auto unblock = [&](int64_t n0, int64_t blocks, int64_t rows) {
    const at::Tensor b = bytes.narrow(0, n0 * K * bits / 8, blocks * rows * K * bits / 8);
    const at::Tensor q = bits == 8 ? b.view({blocks, G, 8, rows, 4}).permute({0, 3, 1, 2, 4})  // [., G, i, r, j]
                                   : at::stack({at::bitwise_and(b, 15), at::bitwise_right_shift(b, 4)}, -1)
                                         .view({blocks, G, 4, rows, 4, 2})  // [., G, o, r, j, nibble]
                                         .permute({0, 3, 1, 2, 5, 4});
    const auto per_row = [&](const at::Tensor& t) {
      return t.narrow(0, n0 * G, blocks * rows * G).view({blocks, G, rows}).permute({0, 2, 1}).reshape({-1, G, 1});
    };
    parts.push_back((q.reshape({blocks * rows, G, kGroup}).to(at::kFloat) * per_row(scales).to(at::kFloat) +
                     per_row(minimums).to(at::kFloat))
                        .view({blocks * rows, K}));
  };
  if (N >= kBlockRows) unblock(0, N / kBlockRows, kBlockRows);
  if (N % kBlockRows) unblock(N / kBlockRows * kBlockRows, 1, N % kBlockRows);
  return parts.size() == 1 ? parts[0] : at::cat(parts);
}

template <int Bits>
at::Tensor linear_groups(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                         const at::Tensor& minimum, const c10::optional<at::Tensor>& bias,
                         const c10::optional<at::Tensor>& rows, int64_t input_bits) {
  const char* op = Bits == 8 ? "tpserve::linear_int8" : "tpserve::linear_int4";
  TORCH_CHECK(input_bits == 8 || input_bits == 16, op, ": input_bits is 8 or 16, got ", input_bits);
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(), op,
              ": qweight must be contiguous uint8 [N, K * ", Bits, " / 8]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 8 / Bits;
  TORCH_CHECK(K % kGroup == 0 && scale.sizes() == at::IntArrayRef({N, K / kGroup}) && minimum.sizes() == scale.sizes(),
              op, ": one scale and one minimum per group of 32 weights");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && minimum.scalar_type() == at::kHalf, op,
              ": scale and minimum must be float16");
  TORCH_CHECK(x.size(-1) == K, op, ": x has ", x.size(-1), " features, the weights ", K);
  // rows: only the first rows of x are real (linear.cpp); the padding rows' outputs are zeros
  const int64_t M = tpserve_simd::used_rows(x, rows);
  const bool stream = x.device().is_cpu() && x.scalar_type() == at::kFloat &&
                      scale.is_contiguous() && minimum.is_contiguous() && !x.requires_grad() &&
                      (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) && tpserve_simd::cpu_has_avx2_fma() &&
                      __builtin_cpu_supports("f16c");
  if (!stream && !rows) return at::linear(x, dequantize(qweight, scale, minimum, Bits).to(x.scalar_type()), bias);
  if (!stream) {
    const tpserve_simd::RealRows real = tpserve_simd::real_rows(x, N, M);
    at::Tensor out = real.out;
    if (M > 0) at::linear_out(out, real.x, dequantize(qweight, scale, minimum, Bits).to(x.scalar_type()), bias);
    return real.y;
  }
  // the real rows read in place, the padding rows' outputs zeroed (as tpserve::linear: no views per call)
  const at::Tensor y = tpserve_simd::output_with_zero_padding(x, N, M);
  if (M == 0) return y;
  const at::Tensor xc = x.contiguous();
  const float* in = xc.data_ptr<float>();
  const uint8_t* qw = qweight.data_ptr<uint8_t>();
  const uint16_t* dw = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const uint16_t* mw = reinterpret_cast<const uint16_t*>(minimum.data_ptr<at::Half>());
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // threads split the weights in whole blocks
  const int64_t blocks = (N + kBlockRows - 1) / kBlockRows;
  const int64_t grain = (std::max<int64_t>(64, (32 * 1024) / (K * Bits / 8)) + kBlockRows - 1) / kBlockRows;
  const auto split = [&](const auto& work) {
    at::parallel_for(0, blocks, grain,
                     [&](int64_t begin, int64_t end) { work(begin * kBlockRows, std::min(N, end * kBlockRows)); });
  };
  const bool wide = tpserve_blocks::use_vnni();
  // the calling thread's buffer for the quantized inputs, kept between calls (4 allocations a call
  // otherwise); named through a reference, which the threads' lambdas capture (a thread_local named
  // inside them would be each thread's own)
  static thread_local tpserve_blocks::Inputs kept;
  tpserve_blocks::Inputs& inputs = kept;
  tpserve_blocks::fit_inputs(inputs, M, K, input_bits / 8);
  at::parallel_for(0, M * (K / kGroup), 2048, [&](int64_t begin, int64_t end) {
    tpserve_blocks::quantize_inputs(in, inputs, begin, end, wide);
  });
  const tpserve_blocks::Block* kernels =
      input_bits == 16 ? (wide ? tpserve_blocks::kBlocks512<Bits, 2> : tpserve_blocks::kBlocks256<Bits, 2>)
                       : (wide ? tpserve_blocks::kBlocks512<Bits, 1> : tpserve_blocks::kBlocks256<Bits, 1>);
  constexpr int64_t chunk = tpserve_blocks::kMaxRows;
  for (int64_t r0 = 0; r0 < M; r0 += kRowTile) {
    const int64_t r1 = std::min(M, r0 + kRowTile);
    split([&](int64_t begin, int64_t end) {
      for (int64_t n0 = begin; n0 < end; n0 += kBlockRows)
        for (int64_t m0 = r0; m0 < r1; m0 += chunk)  // a block's weights stay in L1 across the rows
          kernels[std::min(chunk, r1 - m0) - 1](inputs, m0, qw, dw, mw, bp, yp, K, N, n0,
                                                static_cast<int>(std::min(kBlockRows, N - n0)));
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) {
  m.def("linear_int8(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, Tensor? bias=None, Tensor? rows=None, int input_bits=16) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor qweight, Tensor scale, Tensor minimum, Tensor? bias=None, Tensor? rows=None, int input_bits=16) -> Tensor");
  m.def("quantized_values(Tensor qweight, Tensor scale, Tensor minimum, int bits) -> Tensor");
}

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) {
  m.impl("linear_int8", TORCH_FN(linear_groups<8>));
  m.impl("linear_int4", TORCH_FN(linear_groups<4>));
  m.impl("quantized_values", TORCH_FN(dequantize));
}
