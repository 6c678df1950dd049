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

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int64_t TILE = 512;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Masked scores are this finite floor rather than -inf: the build uses -ffast-math (finite math), and
// fast_exp of anything this low is below 1e-37, nothing next to the row max's exp(0) = 1.
constexpr float MASKED = -1e30f;
constexpr float EMPTY = -1e29f;  // a running max below this means the row has seen no key yet

// exp(x) for x <= 0 as 2^n * 2^f with a degree-6 polynomial for 2^f on [0, 1) (relative error ~2e-7).
// Plain arithmetic so that loops calling it vectorise; libm's expf made the kernel 1.8x slower.
inline float fast_exp(float x) {
  const float t = std::max(x, -87.f) * 1.4426950409f;
  const float n = std::floor(t);
  const float f = t - n;
  float p = 1.535336188e-4f;
  p = p * f + 1.339887440e-3f;
  p = p * f + 9.618437357e-3f;
  p = p * f + 5.550332471e-2f;
  p = p * f + 2.402264791e-1f;
  p = p * f + 6.931472028e-1f;
  p = p * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

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
  int rows, d;
  std::vector<float> m, l, acc;
  Softmax(int rows_, int d_) : rows(rows_), d(d_), m(rows_, MASKED), l(rows_, 0.f), acc((size_t)rows_ * d_, 0.f) {}

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

// q (BH, nb, rows, D); k, v (BKV, T, D); kv_of (BH,) which K/V head each task reads;
// far_pos/far_ok (BH, nb, Kf); near_start (nb,) first near position (may be negative);
// near_ok (BH, nb, bq, Kn); rows = bq * fold (row r is query r / fold).
// Returns out (BH, nb, rows, D) and lse (BH, nb, rows), -inf (with out 0) where a row saw no key.
std::vector<torch::Tensor> attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor kv_of,
                                  torch::Tensor far_pos, torch::Tensor far_ok, torch::Tensor near_start,
                                  torch::Tensor near_ok, int64_t fold, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32,
              "block_sparse: float32 inputs only");
  q = q.contiguous(); k = k.contiguous(); v = v.contiguous();
  kv_of = kv_of.to(torch::kInt64).contiguous();
  far_pos = far_pos.to(torch::kInt64).contiguous(); far_ok = far_ok.to(torch::kBool).contiguous();
  near_start = near_start.to(torch::kInt64).contiguous(); near_ok = near_ok.to(torch::kBool).contiguous();
  const int64_t bh = q.size(0), nb = q.size(1), rows = q.size(2), d = q.size(3);
  const int64_t t = k.size(1), kf = far_pos.size(2), bq = near_ok.size(2), kn = near_ok.size(3);
  TORCH_CHECK(rows == bq * fold, "block_sparse: rows must be block_q * fold");
  auto out = torch::empty_like(q);
  auto lse = torch::empty({bh, nb, rows}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int64_t* kvp = kv_of.data_ptr<int64_t>();
  const int64_t* fpp = far_pos.data_ptr<int64_t>();
  const bool* fop = far_ok.data_ptr<bool>();
  const int64_t* nsp = near_start.data_ptr<int64_t>();
  const bool* nop = near_ok.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int ri = static_cast<int>(rows), di = static_cast<int>(d);

  at::parallel_for(0, bh * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt((size_t)TILE * d), vt((size_t)TILE * d), s((size_t)rows * TILE);
    bool col[TILE];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / nb, b = task % nb;
      const float* qb = qp + task * rows * d;
      const float* kh = kp + kvp[h] * t * d;
      const float* vh = vp + kvp[h] * t * d;
      Softmax sm(ri, di);
      // far keys: gathered into the tile, one visibility flag per key shared by every row
      const int64_t* pos = fpp + task * kf;
      const bool* ok = fop + task * kf;
      for (int64_t t0 = 0; t0 < kf; t0 += TILE) {
        const int n = static_cast<int>(std::min(TILE, kf - t0));
        int visible = 0;
        for (int j = 0; j < n; ++j) {
          col[j] = ok[t0 + j];
          visible += ok[t0 + j];
          std::memcpy(kt.data() + (size_t)j * d, kh + pos[t0 + j] * d, d * sizeof(float));
          std::memcpy(vt.data() + (size_t)j * d, vh + pos[t0 + j] * d, d * sizeof(float));
        }
        if (visible == 0) continue;
        scores(qb, kt.data(), s.data(), ri, n, di, sc);
        const bool* keep = visible == n ? nullptr : col;
        for (int r = 0; r < ri; ++r) sm.row(s.data() + (size_t)r * TILE, n, r, keep);
        accumulate(s.data(), vt.data(), sm.acc.data(), ri, n, di);
      }
      // near band: contiguous keys read in place, visibility per query
      const int64_t start = nsp[b];
      const bool* nok = nop + task * bq * kn;
      const int64_t lo = std::max<int64_t>(start, 0), hi = std::min<int64_t>(start + kn, t);  // [lo, hi)
      for (int64_t t0 = lo; t0 < hi; t0 += TILE) {
        const int n = static_cast<int>(std::min(TILE, hi - t0));
        const int64_t c0 = t0 - start;  // column of key t0 in near_ok
        scores(qb, kh + t0 * d, s.data(), ri, n, di, sc);
        bool any = false;
        for (int r = 0; r < ri; ++r) any |= sm.row(s.data() + (size_t)r * TILE, n, r, nok + (r / fold) * kn + c0);
        if (any) accumulate(s.data(), vh + t0 * d, sm.acc.data(), ri, n, di);
      }
      float* ob = op + task * rows * d;
      float* lb = lp + task * rows;
      for (int r = 0; r < ri; ++r) {
        const float inv = sm.l[r] > 0.f ? 1.f / sm.l[r] : 0.f;
        for (int c = 0; c < di; ++c) ob[(size_t)r * d + c] = sm.acc[(size_t)r * d + c] * inv;
        lb[r] = sm.l[r] > 0.f ? sm.m[r] + std::log(sm.l[r]) : NEG_INF;
      }
    }
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "fused block-sparse attention for one chunk of query blocks (float32, CPU)");
}
