// Block-sparse attention for one chunk of query blocks, fused: no gathered K/V tensors, no masks in
// memory beyond the layout's own. Each (head, query block) task streams its keys in tiles of up to
// TILE keys (far keys copied into a thread-local tile, the near band read in place), scores them with
// one GEMM, and keeps an online softmax (running max, running sum, rescaled accumulator), as flash
// attention does. Tasks run on torch's intra-op thread pool; the GEMMs are MKL's sgemm (sequential
// inside a parallel region).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "fast_math.h"

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

#ifndef LR_TILE
#define LR_TILE 512
#endif
constexpr int64_t TILE = LR_TILE;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Masked scores are this finite floor rather than -inf: the build uses -ffast-math (finite math), and
// fast_exp of anything this low is below 1e-37, nothing next to the row max's exp(0) = 1.
constexpr float MASKED = -1e30f;
constexpr float EMPTY = -1e29f;  // a running max below this means the row has seen no key yet

using longreach::fast_exp;

// Row-major S (rows x n, leading dim TILE) = scale * Q (rows x d) . K (n x d)^T, written as the column-major
// product S^T = K . Q^T that BLAS computes.
void scores(const float* q, const float* k, float* s, int rows, int n, int d, float scale) {
  const float zero = 0.f;
  const int lds = TILE;
  sgemm_("T", "N", &n, &rows, &d, &scale, k, &d, q, &d, &zero, s, &lds);
}

// acc (rows x d) += P (rows x n, leading dim TILE) . V (n x d).
void accumulate(const float* p, const float* v, float* acc, int rows, int n, int d) {
  const float one = 1.f;
  const int ldp = TILE;
  sgemm_("N", "N", &d, &rows, &n, &one, v, &d, p, &ldp, &one, acc, &d);
}

struct Softmax {
  int d;
  std::vector<float> m, l, acc;
  Softmax(int rows_, int d_) : d(d_), m(rows_, MASKED), l(rows_, 0.f), acc((size_t)rows_ * d_, 0.f) {}
  void reset() {  // one per thread, reset per task (no allocation per task)
    std::fill(m.begin(), m.end(), MASKED);
    std::fill(l.begin(), l.end(), 0.f);
    std::fill(acc.begin(), acc.end(), 0.f);
  }

  // Turn row r of the (already scaled) scores into probabilities against the new running max; keep[j]
  // says whether key j of the tile is visible to that row. Returns false when the row sees none of them.
  // Plain loops over contiguous floats so that the compiler vectorises them (expf included, -ffast-math).
  bool row(float* __restrict s, int n, int r, const bool* __restrict keep) {
    if (keep != nullptr)  // nullptr: every key of the tile is visible
      for (int j = 0; j < n; ++j) s[j] = keep[j] ? s[j] : MASKED;
    float mx = MASKED;
    for (int j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    if (mx < EMPTY) {
      std::fill(s, s + n, 0.f);
      return false;
    }
    const float m_new = std::max(m[r], mx);
    const float alpha = fast_exp(m[r] - m_new);  // ~0 for the first visible tile (m starts at MASKED)
    float sum = 0.f;
    for (int j = 0; j < n; ++j) {
      const float p = fast_exp(s[j] - m_new);
      s[j] = p;
      sum += p;
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
    if (alpha != 1.f) {
      float* a = acc.data() + (size_t)r * d;
      for (int c = 0; c < d; ++c) a[c] *= alpha;
    }
    return true;
  }
};

}  // namespace

// Attention for a Selection, straight from its block indices (no layout tensors): task (h, b) is selection
// head h (of BH = batch x selection heads) and query block b.
// q (B, Hq, Tq, D) with Hq = heads * fold, rows of D contiguous floats and any other strides: read in place
// (each task copies its rows into a thread-local tile), so no blocked copy of q exists. A task's rows are
// row_block * fold: row r is query b * block_q + r / fold of q head (selection head) * fold + r % fold;
// row_block is block_q, or q_len when one block holds fewer queries. k, v (BKV, T, D); kv_of (BH,) which
// K/V head h reads; indices (BH, nQB, K) chosen key blocks (-1 empty; duplicates counted once); key_mask
// (B, T) bool or an empty tensor. Keys visible to query p (as Selection.mask_rows): j <= p and, for j within
// the last `window` positions, always; further back only sinks and chosen blocks; key_mask drops padding.
// Writes out (B, Tq, Hq, D) and lse (B, Tq, Hq), the layout the caller hands on (no copy after the
// kernel): lse -inf (with out 0) where a row saw no key.
void attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_of, torch::Tensor indices,
            torch::Tensor key_mask, int64_t heads, int64_t q_len, int64_t q_offset, int64_t block_q,
            int64_t row_block, int64_t block_k, int64_t sinks, int64_t window, int64_t fold, double scale,
            torch::Tensor out, torch::Tensor lse) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "block_sparse: float32 inputs only");
  if (q.stride(3) != 1) q = q.contiguous();
  // K/V may be views of a cache with spare room (cache.growing): any head stride, rows of D contiguous floats
  if (k.stride(2) != 1 || k.stride(1) != k.size(2)) k = k.contiguous();
  if (v.stride(2) != 1 || v.stride(1) != v.size(2)) v = v.contiguous();
  kv_of = kv_of.to(torch::kInt64).contiguous();
  indices = indices.to(torch::kInt64).contiguous();
  const bool masked = key_mask.numel() > 0;
  if (masked) key_mask = key_mask.to(torch::kBool).contiguous();
  const int64_t nb = q.size(0), hq = q.size(1), tq = q.size(2), d = q.size(3);
  const int64_t bh = nb * heads, n_qb = indices.size(1), rows = row_block * fold;
  const int64_t t = k.size(1), n_idx = indices.size(2);
  const int64_t k_head = k.stride(0), v_head = v.stride(0);
  const int64_t qs_b = q.stride(0), qs_h = q.stride(1), qs_t = q.stride(2);
  TORCH_CHECK(hq == heads * fold && tq == q_len && indices.size(0) == bh,
              "block_sparse: q must be (B, heads * fold, q_len, D) and indices (B * heads, nQB, K)");
  // every query row is written exactly once (out and lse are not initialised): the blocks must tile q_len
  TORCH_CHECK(n_qb >= 1 && (n_qb - 1) * block_q < q_len && (n_qb - 1) * block_q + row_block >= q_len &&
                  (n_qb == 1 || row_block == block_q),
              "block_sparse: nQB query blocks of block_q rows (row_block in the last) must cover q_len");
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && out.size(0) == nb && out.size(1) == tq &&
              out.size(2) == hq && out.size(3) == d && lse.numel() == nb * tq * hq,
              "block_sparse: out must be a contiguous (B, Tq, Hq, D) tensor and lse (B, Tq, Hq)");
  const int64_t n_kb = (t + block_k - 1) / block_k;
  const int64_t win = std::min(window, t), snk = std::min(sinks, t);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* kvp = kv_of.data_ptr<int64_t>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const bool* kmp = masked ? key_mask.data_ptr<bool>() : nullptr;
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int ri = static_cast<int>(rows), di = static_cast<int>(d);

  at::parallel_for(0, bh * n_qb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt((size_t)TILE * d), vt((size_t)TILE * d), s((size_t)rows * TILE), qt((size_t)rows * d);
    std::vector<uint8_t> chosen(n_kb);
    std::vector<int64_t> far;
    Softmax sm(ri, di);
    bool keep[TILE], unpadded[TILE], behind[TILE];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / n_qb, b = task % n_qb;
      const int64_t bi = h / heads, head0 = (h % heads) * fold;  // batch row, first q head of the task
      const float* kh = kp + kvp[h] * k_head;
      const float* vh = vp + kvp[h] * v_head;
      const bool* km = masked ? kmp + (h / heads) * t : nullptr;
      const int64_t first = q_offset + b * block_q;
      const int64_t n_valid = std::min(row_block, q_len - b * block_q);
      const int64_t far_limit = first - win;  // far keys: j <= far_limit (behind every query's window)
      float* qb = qt.data();  // the task's rows (query, folded head), padding rows zero
      for (int64_t i = 0; i < row_block; ++i)
        for (int64_t f = 0; f < fold; ++f) {
          float* dst = qb + (i * fold + f) * d;
          if (i < n_valid)
            std::memcpy(dst, qp + bi * qs_b + (head0 + f) * qs_h + (b * block_q + i) * qs_t, d * sizeof(float));
          else
            std::fill(dst, dst + d, 0.f);
        }
      // far keys: sinks, then each chosen block once; every query of the block sees all of them
      std::fill(chosen.begin(), chosen.end(), 0);
      far.clear();
      for (int64_t j = 0; j < std::min(snk, far_limit + 1); ++j)
        if (!km || km[j]) far.push_back(j);
      const int64_t* idx = ip + task * n_idx;
      for (int64_t e = 0; e < n_idx; ++e) {
        const int64_t blk = idx[e];
        if (blk < 0 || blk >= n_kb || chosen[blk]) continue;
        chosen[blk] = 1;
        const int64_t j1 = std::min({blk * block_k + block_k - 1, far_limit, t - 1});
        for (int64_t j = std::max(blk * block_k, snk); j <= j1; ++j)
          if (!km || km[j]) far.push_back(j);
      }
      sm.reset();
      const int64_t n_far = static_cast<int64_t>(far.size());
      for (int64_t t0 = 0; t0 < n_far; t0 += TILE) {
        const int n = static_cast<int>(std::min(TILE, n_far - t0));
        for (int j = 0; j < n; ++j) {
          std::memcpy(kt.data() + (size_t)j * d, kh + far[t0 + j] * d, d * sizeof(float));
          std::memcpy(vt.data() + (size_t)j * d, vh + far[t0 + j] * d, d * sizeof(float));
        }
        scores(qb, kt.data(), s.data(), ri, n, di, sc);
        for (int r = 0; r < ri; ++r) sm.row(s.data() + (size_t)r * TILE, n, r, nullptr);
        accumulate(s.data(), vt.data(), sm.acc.data(), ri, n, di);
      }
      // near band (far_limit, last query]: contiguous keys read in place, visibility per query
      const int64_t lo = std::max<int64_t>(far_limit + 1, 0), hi = std::min(first + n_valid, t);  // [lo, hi)
      for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        const int n = static_cast<int>(std::min(TILE, hi - t0));
        scores(qb, kh + t0 * d, s.data(), ri, n, di, sc);
        // per key once: visible when in a query's window (unless padding), and further back when a sink
        // or in a chosen block; per query: causal and which of the two applies (shared by its fold rows)
        for (int j = 0; j < n; ++j) {
          const int64_t key = t0 + j;
          unpadded[j] = !km || km[key];
          behind[j] = unpadded[j] && (key < snk || chosen[key / block_k]);
        }
        bool any = false;
        for (int64_t i = 0; i < row_block; ++i) {
          const int64_t p = first + i;
          if (i < n_valid) {
            for (int j = 0; j < n; ++j) {
              const int64_t key = t0 + j;
              keep[j] = key <= p && (key > p - win ? unpadded[j] : behind[j]);
            }
          } else {
            std::fill(keep, keep + n, false);
          }
          for (int64_t f = 0; f < fold; ++f) {
            const int r = static_cast<int>(i * fold + f);
            any |= sm.row(s.data() + (size_t)r * TILE, n, r, keep);
          }
        }
        if (any) accumulate(s.data(), vh + t0 * d, sm.acc.data(), ri, n, di);
      }
      for (int r = 0; r < ri; ++r) {
        const int64_t i = r / fold, f = r % fold;
        if (i >= n_valid) continue;  // padding rows of a short last block
        const int64_t at = (bi * tq + b * block_q + i) * hq + head0 + f;
        const float inv = sm.l[r] > 0.f ? 1.f / sm.l[r] : 0.f;
        float* o = op + at * d;
        for (int c = 0; c < di; ++c) o[c] = sm.acc[(size_t)r * d + c] * inv;
        lp[at] = sm.l[r] > 0.f ? sm.m[r] + std::log(sm.l[r]) : NEG_INF;
      }
    }
  });
}

torch::Tensor linear_row(const torch::Tensor& x, const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias);
std::vector<torch::Tensor> quant_decode(torch::Tensor q, const torch::Tensor& k_codes, const torch::Tensor& k_scale,
                                        const torch::Tensor& k_zero, const torch::Tensor& v_codes,
                                        const torch::Tensor& v_scale, const torch::Tensor& v_zero,
                                        torch::Tensor k_rest, torch::Tensor v_rest, int64_t bits, int64_t group,
                                        double softcap);
std::vector<torch::Tensor> dense_decode(torch::Tensor q, const torch::Tensor& k, const torch::Tensor& v,
                                        double softcap);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Neither touches a Python object: release the GIL, as torch's own ops do (the server's event loop runs beside
  // the model's thread).
  m.def("attend", &attend, "fused block-sparse attention for a Selection (float32, CPU)",
        py::call_guard<py::gil_scoped_release>());
  m.def("linear_row", &linear_row, "one row through a linear layer, output rows over the threads (row_linear.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_decode", &quant_decode, "decode attention over a kvquant cache's codes and residual (quant_decode.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("dense_decode", &dense_decode, "split-K decode attention over a float32 cache (dense_decode.cpp)",
        py::call_guard<py::gil_scoped_release>());
}
