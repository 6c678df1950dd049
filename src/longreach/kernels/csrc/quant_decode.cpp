// Decode attention read straight from a kvquant cache (KIVI codes): one query per head over int8 or packed int4
// keys and values, then the full-precision residual, without a dequantized copy of the cache.
//
// Why: dequantizing first writes and re-reads the whole cache in fp32 at every step, so a cache holding 5x
// fewer bytes decoded slower than a full-precision one (docs/kvquant.md). Here each code is read once and
// folded into the arithmetic:
//   keys, per channel d over groups of `group` tokens:  q.k_t = sum_d (q_d s_gd) c_td + sum_d q_d z_gd,
//     so one scaled query and one bias per token group, then a dot product with the codes;
//   values, per token over groups of channels j:  sum_t p_t v_td = sum_t (p_t s_tj) c_td + sum_t p_t z_tj.
// Work is split over (batch, KV head, chunk of tokens) tasks with a softmax per task (max, sum, accumulator),
// merged at the end by log-sum-exp, as split-K decoding does: SmolLM2 has 3 KV heads, too few to share out
// alone. The query heads of a GQA group share every decoded code row.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode.h"

namespace {

using longreach::axpy;
using longreach::dot;
using longreach::softcap_rows;
using longreach::softmax_rows;

constexpr int64_t CHUNK = 256;  // tokens per task (rounded up to whole key groups)

// One token's codes (a row of D elements, at 4 bits two per byte, low nibble first) as floats.
inline void decode_row(const uint8_t* __restrict c, float* __restrict out, int64_t d, int64_t bits) {
  if (bits == 8) {
    for (int64_t i = 0; i < d; ++i) out[i] = static_cast<float>(c[i]);
    return;
  }
  const int64_t pairs = d / 2;
  for (int64_t i = 0; i < pairs; ++i) {
    const uint8_t b = c[i];
    out[2 * i] = static_cast<float>(b & 0x0F);
    out[2 * i + 1] = static_cast<float>(b >> 4);
  }
  if (d % 2) out[d - 1] = static_cast<float>(c[pairs] & 0x0F);
}

void check_codes(const torch::Tensor& codes, const torch::Tensor& scale, const torch::Tensor& zero, const char* what) {
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.dim() == 4 && codes.is_contiguous(),
              "quant_decode: ", what, " codes must be contiguous uint8 (B, H, n, packed D)");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && zero.scalar_type() == torch::kFloat && scale.is_contiguous()
                  && zero.is_contiguous() && scale.sizes() == zero.sizes() && scale.dim() == 4,
              "quant_decode: ", what, " scales and zero points must be contiguous float32 of one shape");
}

}  // namespace

// q (B, Hq, D) float32, already multiplied by the attention scale. Keys: codes (B, H, n, Dc) with statistics
// (B, H, n / group, D) (groups of tokens; n a multiple of group); values: codes (B, H, n, Dc) with statistics
// (B, H, n, ceil(D / group)) (groups of channels). Dc = D at 8 bits, ceil(D / 2) at 4. k_rest, v_rest
// (B, H, r, D) float32: the residual after the quantized tokens (the newest). softcap > 0 passes scores through
// cap * tanh(s / cap). Returns out (B, Hq, D) and lse (B, Hq) (-inf with out 0 for a row with no key).
std::vector<torch::Tensor> quant_decode(torch::Tensor q, const torch::Tensor& k_codes, const torch::Tensor& k_scale,
                                        const torch::Tensor& k_zero, const torch::Tensor& v_codes,
                                        const torch::Tensor& v_scale, const torch::Tensor& v_zero,
                                        torch::Tensor k_rest, torch::Tensor v_rest, int64_t bits, int64_t group,
                                        double softcap) {
  TORCH_CHECK(bits == 8 || bits == 4, "quant_decode: bits must be 8 or 4");
  TORCH_CHECK(group >= 1, "quant_decode: group must be at least 1");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.dim() == 3, "quant_decode: q must be float32 (B, Hq, D)");
  check_codes(k_codes, k_scale, k_zero, "key");
  check_codes(v_codes, v_scale, v_zero, "value");
  q = q.contiguous();
  k_rest = k_rest.contiguous();
  v_rest = v_rest.contiguous();
  const int64_t nb = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t h = k_codes.size(1), n = k_codes.size(2), dc = bits == 8 ? d : (d + 1) / 2;
  const int64_t n_vg = (d + group - 1) / group, r = k_rest.size(2);
  TORCH_CHECK(h > 0 && hq % h == 0, "quant_decode: query heads must be a multiple of KV heads");
  TORCH_CHECK(n % group == 0, "quant_decode: quantized keys must fill whole groups of tokens");
  TORCH_CHECK(k_codes.sizes() == torch::IntArrayRef({nb, h, n, dc}) && v_codes.sizes() == k_codes.sizes(),
              "quant_decode: key and value codes must be (B, H, n, ", dc, ")");
  TORCH_CHECK(k_scale.sizes() == torch::IntArrayRef({nb, h, n / group, d}),
              "quant_decode: key statistics must be (B, H, n / group, D)");
  TORCH_CHECK(v_scale.sizes() == torch::IntArrayRef({nb, h, n, n_vg}),
              "quant_decode: value statistics must be (B, H, n, ceil(D / group))");
  TORCH_CHECK(k_rest.scalar_type() == torch::kFloat && v_rest.scalar_type() == torch::kFloat
                  && k_rest.sizes() == torch::IntArrayRef({nb, h, r, d}) && v_rest.sizes() == k_rest.sizes(),
              "quant_decode: the residual keys and values must be float32 (B, H, r, D)");

  const int64_t g_heads = hq / h;
  const int64_t chunk = std::max<int64_t>(1, CHUNK / group) * group;
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int64_t per_head = n_chunks + (r > 0 ? 1 : 0);  // the residual is one more task
  const int64_t tasks = nb * h * per_head;
  const int64_t width = std::max(chunk, r);
  std::vector<float> part_m(tasks * g_heads), part_l(tasks * g_heads), part_acc(tasks * g_heads * d);

  const float* qp = q.data_ptr<float>();
  const uint8_t* kc = k_codes.data_ptr<uint8_t>();
  const uint8_t* vc = v_codes.data_ptr<uint8_t>();
  const float *ks = k_scale.data_ptr<float>(), *kz = k_zero.data_ptr<float>();
  const float *vs = v_scale.data_ptr<float>(), *vz = v_zero.data_ptr<float>();
  const float *kr = k_rest.data_ptr<float>(), *vr = v_rest.data_ptr<float>();
  const float cap = static_cast<float>(softcap);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(g_heads * width), row(d), qs(g_heads * d), bias(g_heads), zacc(g_heads * n_vg);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_head, c = task % per_head;  // bh = b * h + kv head
      const float* qh = qp + bh * g_heads * d;  // the query heads of this KV head are consecutive
      float* m = part_m.data() + task * g_heads;
      float* l = part_l.data() + task * g_heads;
      float* acc = part_acc.data() + task * g_heads * d;
      if (c == n_chunks) {  // the full-precision residual
        longreach::any_float_task(qh, g_heads, kr + bh * r * d, vr + bh * r * d, r, d, cap, s.data(), width, m, l, acc);
        continue;
      }
      std::fill(acc, acc + g_heads * d, 0.f);
      const int64_t t0 = c * chunk, t1 = std::min(n, t0 + chunk), len = t1 - t0;
      // scores: per key group, the query scaled by the group's per-channel scales and a bias from its zeros
      for (int64_t t = t0; t < t1; t += group) {
        const int64_t grp = bh * (n / group) + t / group;
        const float* sc = ks + grp * d;
        const float* zr = kz + grp * d;
        for (int64_t g = 0; g < g_heads; ++g) {
          const float* qg = qh + g * d;
          float* qsg = qs.data() + g * d;
          for (int64_t i = 0; i < d; ++i) qsg[i] = qg[i] * sc[i];
          bias[g] = dot(qg, zr, d);
        }
        for (int64_t u = t; u < t + group; ++u) {
          decode_row(kc + (bh * n + u) * dc, row.data(), d, bits);
          for (int64_t g = 0; g < g_heads; ++g) s[g * width + (u - t0)] = bias[g] + dot(qs.data() + g * d, row.data(), d);
        }
      }
      softcap_rows(s.data(), g_heads, len, width, cap);
      softmax_rows(s.data(), g_heads, len, width, m, l);
      // values: per token, each channel group's probability-weighted scale on the codes, the zeros summed apart
      std::fill(zacc.begin(), zacc.end(), 0.f);
      for (int64_t u = t0; u < t1; ++u) {
        const int64_t tok = bh * n + u;
        decode_row(vc + tok * dc, row.data(), d, bits);
        const float* sc = vs + tok * n_vg;
        const float* zr = vz + tok * n_vg;
        for (int64_t g = 0; g < g_heads; ++g) {
          const float p = s[g * width + (u - t0)];
          float* a = acc + g * d;
          for (int64_t j = 0; j < n_vg; ++j) {
            const float w = p * sc[j];
            zacc[g * n_vg + j] += p * zr[j];
            axpy(a, row.data(), w, j * group, std::min(d, j * group + group));
          }
        }
      }
      for (int64_t g = 0; g < g_heads; ++g)
        for (int64_t j = 0; j < n_vg; ++j) {
          const int64_t lo = j * group, hi = std::min(d, lo + group);
          for (int64_t i = lo; i < hi; ++i) acc[g * d + i] += zacc[g * n_vg + j];
        }
    }
  });

  // merge each query head's tasks by log-sum-exp
  torch::Tensor out = torch::zeros({nb, hq, d}, q.options());
  torch::Tensor lse = torch::full({nb, hq}, -std::numeric_limits<float>::infinity(), q.options());
  if (per_head == 0) return {out, lse};  // no key at all
  longreach::merge_tasks(part_m.data(), part_l.data(), part_acc.data(), nb * h, per_head, g_heads, d,
                         out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}
