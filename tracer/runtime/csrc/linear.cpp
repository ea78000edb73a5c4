// tpserve::linear: y = x W^T + b with fp32 weights, streaming the weights once for inputs of a few
// rows (the quantized weights: linear_quantized.cpp).
//
// A decoder's generation step multiplies a handful of rows (one token per sequence) by every weight
// matrix: the work is reading the weights from memory. MKL's sgemm packs the weight matrix first for
// such shapes and runs at a fraction of the memory bandwidth (measured here: 4 rows x 1536x576 take
// 2.5x the time of 1 row). This kernel reads each weight row once, multiplies it with all input rows
// (AVX2 + FMA, fp32 accumulation) and splits the output features over the intra-op threads; short
// prompts and short texts (up to 64 rows) are done tile by tile, each tile read from memory once, or
// with AVX-512, up to 96 rows, by the column kernel (fp32_columns.h). Other shapes, dtypes, devices and
// CPUs without AVX2 go to at::linear, so the op is safe to record in any traced graph.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include "fp32_columns.h"
#include "fp32_rows.h"
#include "simd.h"

namespace {

using tpserve_fp32::kMaxRows;  // one pass over the weights for all rows
using tpserve_fp32::RowsKernel;
// More rows, up to max_streamed_rows() (simd.h): passes of kernels().chunk rows over tiles of W small
// enough to stay in L2, so W still comes from memory once.
constexpr int64_t kTileBytes = 128 * 1024;
constexpr int64_t kBlockRows = 6;  // weight rows per kernel call within a pass

using tpserve_simd::cpu_has_avx2_fma;
using tpserve_simd::kPrefetchBytes;
using tpserve_simd::max_streamed_rows;

// y [M, N] = x W^T + bias for the first M rows of x (contiguous; M: few_rows()); output features split over
// the threads, each thread streaming its own contiguous block of W (beyond kMaxRows rows: the column
// kernel, or tile by tile).
void stream_rows(const at::Tensor& x, int64_t M, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 float* yp) {
  const int64_t K = weight.size(1), N = weight.size(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(float));
  const int64_t grain = std::max<int64_t>(64, (64 * 1024) / row_bytes);
  const tpserve_fp32::Kernels kernels = tpserve_fp32::kernels();
  if (M <= kMaxRows) {
    const RowsKernel kernel = kernels.rows[M - 1];
    at::parallel_for(0, N, grain,
                     [&](int64_t begin, int64_t end) { kernel(xp, wp, bp, yp, K, N, begin, end, kPrefetchBytes); });
    return;
  }
  if (tpserve_fp32_columns::takes(M, tpserve_simd::use_avx512())) {
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      tpserve_fp32_columns::weight_range(xp, wp, bp, yp, M, K, N, begin, end);
    });
    return;
  }
  const int64_t tile = std::max<int64_t>(8, kTileBytes / row_bytes);
  at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += tile) {
      const int64_t t1 = std::min(end, t0 + tile);
      // while this tile is multiplied, the next one is fetched into L2 a few lines before each block
      // of kBlockRows weight rows: spread over all the passes, the memory streams while the core
      // computes (in bursts, one per pass, the prefetches stalled the core: SmolLM2's 16-token prompt
      // 44 -> 37 ms, 48 tokens 85 -> 80 ms, alternating in one process)
      const int64_t passes = (M + kernels.chunk - 1) / kernels.chunk;
      const int64_t blocks = passes * ((t1 - t0 + kBlockRows - 1) / kBlockRows);
      const int64_t next_lines = (std::min(end, t1 + tile) - t1) * row_bytes / 64;
      const int64_t lines_per_block = (next_lines + blocks - 1) / blocks;
      const char* next = reinterpret_cast<const char*>(wp + t1 * K);
      int64_t line = 0;
      for (int64_t m0 = 0; m0 < M; m0 += kernels.chunk) {
        const RowsKernel kernel = kernels.rows[std::min(kernels.chunk, M - m0) - 1];
        for (int64_t n0 = t0; n0 < t1; n0 += kBlockRows) {
          for (const int64_t stop = std::min(next_lines, line + lines_per_block); line < stop; ++line)
            _mm_prefetch(next + line * 64, _MM_HINT_T1);
          kernel(xp + m0 * K, wp, bp, yp + m0 * N, K, N, n0, std::min(t1, n0 + kBlockRows),
                 m0 == 0 ? kPrefetchBytes : 0);
        }
      }
    }
  });
}

// Up to how many rows this op beats ATen: max_streamed_rows() (simd.h) with the row kernels, 96 with the
// column kernel on any number of threads (1 thread, SmolLM2's shapes at 37 rows: 1.4x MKL's rate).
bool few_rows(int64_t rows) {
  return rows <= max_streamed_rows() || tpserve_fp32_columns::takes(rows, tpserve_simd::use_avx512());
}

// x's first `rows` rows (rows >= 1) go to stream_rows.
bool few_float_rows(const at::Tensor& x, int64_t rows, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
         weight.dim() == 2 && x.dim() >= 1 && x.size(-1) == weight.size(1) && x.numel() > 0 &&
         few_rows(rows) && weight.is_contiguous() &&
         (!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous())) && !x.requires_grad() &&
         !weight.requires_grad() && cpu_has_avx2_fma();
}

// rows (a one-element tensor, optional): only the first `rows` rows of x (its leading dimensions
// flattened) are real, the rest padding of a bucket: their outputs are zeros, not computed.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& rows) {
  const int64_t used = tpserve_simd::used_rows(x, rows), all = x.numel() / std::max<int64_t>(1, x.size(-1));
  if (used > 0 && few_float_rows(x, used, weight, bias)) {
    // the real rows read in place and the padding rows' outputs zeroed, with no tensor ops for either (a
    // prompt's rows through real_rows' views cost 8 us more per call: ~1 ms of a SmolLM2 prompt)
    at::Tensor y = tpserve_simd::output_with_zero_padding(x, weight.size(0), used);
    stream_rows(x.contiguous(), used, weight, bias, y.data_ptr<float>());
    return y;
  }
  if (used == all) return at::linear(x, weight, bias);
  const tpserve_simd::RealRows real = tpserve_simd::real_rows(x, weight.size(0), used);
  if (used > 0) {
    at::Tensor out = real.out;
    at::linear_out(out, real.x, weight, bias);
  }
  return real.y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tpserve, m) { m.def("linear(Tensor x, Tensor weight, Tensor? bias=None, Tensor? rows=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(tpserve, CompositeExplicitAutograd, m) { m.impl("linear", TORCH_FN(linear)); }
