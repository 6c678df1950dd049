// Decode attention over a float32 KV cache: one query row per head over every stored key, split-K.
//
// Why: PyTorch's CPU SDPA with one query row splits its work over (batch, head) only. SmolLM2 has 3 KV heads for
// 2 threads, and the cache streamed at about 15 GB/s at 16k (1.7 ms a layer, about half of a 16k decode token).
// Here the keys are split into tasks of CHUNK tokens per (batch, KV head), so every thread streams, and the query
// heads of a GQA group share each key and value row read (decode.h). It is used only where it measured faster
// than SDPA (kernels/decode.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode.h"

namespace {

constexpr int64_t CHUNK = 256;  // tokens per task: 64 KiB of keys at d = 64, in L2 while its values stream

void check_rows(const torch::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 4 && x.device().is_cpu(),
              "dense_decode: ", what, " must be float32 CPU (B, H, n, D)");
  TORCH_CHECK(x.stride(3) == 1 && (x.size(2) <= 1 || x.stride(2) == x.size(3)),
              "dense_decode: ", what, " rows must be contiguous (a view of whole rows, as a growing cache hands out)");
}

}  // namespace

// q (B, Hq, D) float32, already multiplied by the attention scale; k, v (B, H, n, D) float32 whose rows are
// contiguous (batch and head strides free: the filled part of a cache buffer). softcap > 0 passes scores through
// cap * tanh(s / cap). Returns out (B, Hq, D) and lse (B, Hq) (-inf with out 0 when n = 0).
std::vector<torch::Tensor> dense_decode(torch::Tensor q, const torch::Tensor& k, const torch::Tensor& v,
                                        double softcap) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 3 && q.device().is_cpu(),
              "dense_decode: q must be float32 CPU (B, Hq, D)");
  check_rows(k, "keys");
  check_rows(v, "values");
  q = q.contiguous();
  const int64_t nb = q.size(0), hq = q.size(1), d = q.size(2), h = k.size(1), n = k.size(2);
  TORCH_CHECK(k.size(0) == nb && k.size(3) == d && v.sizes() == k.sizes(),
              "dense_decode: keys and values must be (B, H, n, D) with q's B and D");
  TORCH_CHECK(h > 0 && hq % h == 0, "dense_decode: query heads must be a multiple of KV heads");
  torch::Tensor out = torch::zeros({nb, hq, d}, q.options());
  torch::Tensor lse = torch::full({nb, hq}, -std::numeric_limits<float>::infinity(), q.options());
  if (n == 0) return {out, lse};

  const int64_t g_heads = hq / h, per_head = (n + CHUNK - 1) / CHUNK, tasks = nb * h * per_head;
  std::vector<float> part_m(tasks * g_heads), part_l(tasks * g_heads), part_acc(tasks * g_heads * d);
  const float* qp = q.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t kb = k.stride(0), kh = k.stride(1), vb = v.stride(0), vh = v.stride(1);
  const float cap = static_cast<float>(softcap);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(g_heads * CHUNK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head, c = task % per_head, b = bh / h, head = bh % h;
      const int64_t t0 = c * CHUNK, len = std::min(n, t0 + CHUNK) - t0;
      longreach::any_float_task(qp + bh * g_heads * d, g_heads, kp + b * kb + head * kh + t0 * d, vp + b * vb + head * vh + t0 * d,
                 len, d, cap, s.data(), CHUNK, part_m.data() + task * g_heads, part_l.data() + task * g_heads,
                 part_acc.data() + task * g_heads * d);
    }
  });
  longreach::merge_tasks(part_m.data(), part_l.data(), part_acc.data(), nb * h, per_head, g_heads, d, out.data_ptr<float>(),
              lse.data_ptr<float>());
  return {out, lse};
}
