// One row through a linear layer (y = x W^T + b), its output rows split over torch's intra-op threads.
// A decode step applies every projection, MLP matrix and the LM head to one row; torch's fp32 GEMV for that
// runs on one thread on our CPUs, so a token streamed its weights at one core's bandwidth (see
// kernels/rowlinear.py for the measurements and when this is used).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

torch::Tensor linear_row(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat, "linear_row: float32 only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_row: CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "linear_row: weight must be a contiguous matrix");
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in && x.numel() == in,
              "linear_row: x must hold exactly one row of ", in, " values in its last dimension");
  const torch::Tensor xc = x.contiguous();
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == torch::kFloat && b.device().is_cpu() && b.numel() == out,
                "linear_row: bias must hold ", out, " CPU floats");
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  torch::Tensor y = torch::empty(sizes, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // Four rows at a time share each load of x; 16 independent partial sums per row let the compiler use full
  // vector registers without a loop-carried dependency on one accumulator.
  const int64_t blocks = (out + 3) / 4;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, out * in / 16384)));
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t r0 = blk * 4, rows = std::min<int64_t>(4, out - r0);
    float acc[4][16] = {};
    const int64_t main = in - in % 16;
    for (int64_t i = 0; i < main; i += 16) {
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = wp + (r0 + r) * in + i;
        // the same columns of the next block's row, requested ahead: on the AMD EPYC SmolLM2's 30 layers' weights
        // streamed 3-9% faster with it (5 alternated runs; further ahead was no better)
        __builtin_prefetch(row + 4 * in, 0, 2);
        for (int j = 0; j < 16; ++j) acc[r][j] += row[j] * xp[i + j];
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float sum = 0.f;
      for (int j = 0; j < 16; ++j) sum += acc[r][j];
      const float* row = wp + (r0 + r) * in;
      for (int64_t i = main; i < in; ++i) sum += row[i] * xp[i];
      yp[r0 + r] = bp ? sum + bp[r0 + r] : sum;
    }
  }
  return y;
}
