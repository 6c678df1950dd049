// Split-K decode arithmetic shared by the float (dense_decode.cpp) and the quantized (quant_decode.cpp) decode
// kernels: one query row per head, the keys split into tasks of consecutive tokens, each task keeping a softmax
// of its own (max, sum, unnormalised output), merged at the end by log-sum-exp. Header-only and inline so that
// the loops vectorise in each translation unit (native.py hashes it into the build flags).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fast_math.h"

namespace longreach {

constexpr int64_t LANES = 16;  // one AVX-512 register (two AVX2 ones) of floats: inner loops of this constant length

constexpr int64_t PREFETCH_ROWS = 8;  // keys requested this many rows ahead of the one being scored

// Ask for a row of d floats to be brought into the caches (a hint: no fault past the end of a buffer). A decode task
// streams two buffers, its keys and then its values; with only the hardware's prefetch, two threads read the cache at
// 30-42 GB/s on the AMD EPYC against 53 GB/s for a plain sum, and with these requests at 40-49 GB/s in the same
// alternated runs (44.7 GB/s in docs/benchmarks.md's run at 16k).
inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t i = 0; i < d; i += 64 / static_cast<int64_t>(sizeof(float))) __builtin_prefetch(row + i, 0, 2);
}

inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float part[LANES] = {};
  const int64_t main = d - d % LANES;
  for (int64_t i = 0; i < main; i += LANES)
    for (int64_t u = 0; u < LANES; ++u) part[u] += a[i + u] * b[i + u];
  float s = 0.f;
  for (int64_t u = 0; u < LANES; ++u) s += part[u];
  for (int64_t i = main; i < d; ++i) s += a[i] * b[i];
  return s;
}

// a[lo, hi) += w * x[lo, hi)
inline void axpy(float* __restrict a, const float* __restrict x, float w, int64_t lo, int64_t hi) {
  int64_t i = lo;
  for (; i + LANES <= hi; i += LANES)
    for (int64_t u = 0; u < LANES; ++u) a[i + u] += w * x[i + u];
  for (; i < hi; ++i) a[i] += w * x[i];
}

// cap * tanh(s / cap) over rows x n scores (leading dim ld); cap <= 0: unchanged
inline void softcap_rows(float* s, int64_t rows, int64_t n, int64_t ld, float cap) {
  if (cap <= 0.f) return;
  for (int64_t g = 0; g < rows; ++g)
    for (int64_t t = 0; t < n; ++t) s[g * ld + t] = cap * fast_tanh(s[g * ld + t] / cap);
}

// Scores of one task's rows (rows x n, leading dim ld) -> probabilities against each row's max; the maxima and
// sums go to m and l.
inline void softmax_rows(float* s, int64_t rows, int64_t n, int64_t ld, float* m, float* l) {
  for (int64_t g = 0; g < rows; ++g) {
    float* row = s + g * ld;
    float mx = row[0];
    for (int64_t i = 1; i < n; ++i) mx = std::max(mx, row[i]);
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float p = fast_exp(row[i] - mx);
      row[i] = p;
      sum += p;
    }
    m[g] = mx;
    l[g] = sum;
  }
}

// One task over n >= 1 float keys and values (rows of d, row stride d): the g_heads query rows q (consecutive,
// already scaled) get their scores in s (leading dim ld >= n), then m, l and the unnormalised output acc
// (g_heads x d, overwritten). Each key and value row is read once for the whole GQA group.
inline void float_task(const float* __restrict q, int64_t g_heads, const float* __restrict keys,
                       const float* __restrict vals, int64_t n, int64_t d, float cap, float* s, int64_t ld, float* m,
                       float* l, float* acc) {
  for (int64_t t = 0; t < n; ++t) {
    prefetch_row(vals + t * d, d);
    prefetch_row(keys + (t + PREFETCH_ROWS) * d, d);
    for (int64_t g = 0; g < g_heads; ++g) s[g * ld + t] = dot(q + g * d, keys + t * d, d);
  }
  softcap_rows(s, g_heads, n, ld, cap);
  softmax_rows(s, g_heads, n, ld, m, l);
  std::fill(acc, acc + g_heads * d, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < g_heads; ++g) axpy(acc + g * d, vals + t * d, s[g * ld + t], 0, d);
}

// float_task with the GQA group size G and the head width D known at compile time: the group's query rows and
// output rows stay in registers across the task's keys, where the generic loop reloads and stores each output row
// for every value row.
template <int G, int D>
inline void float_task_fixed(const float* __restrict q, const float* __restrict keys, const float* __restrict vals,
                             int64_t n, float cap, float* s, int64_t ld, float* m, float* l, float* acc) {
  static_assert(D % LANES == 0, "D must be a multiple of LANES");
  float qr[G][D];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) qr[g][i] = q[g * D + i];
  for (int64_t t = 0; t < n; ++t) {
    const float* k = keys + t * D;
    prefetch_row(vals + t * D, D);  // the value rows come next: requested while the scores are computed
    prefetch_row(k + PREFETCH_ROWS * D, D);
    float part[G][LANES] = {};
    for (int i = 0; i < D; i += LANES)
      for (int g = 0; g < G; ++g)
        for (int u = 0; u < LANES; ++u) part[g][u] += qr[g][i + u] * k[i + u];
    for (int g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int u = 0; u < LANES; ++u) sum += part[g][u];
      s[g * ld + t] = sum;
    }
  }
  softcap_rows(s, G, n, ld, cap);
  softmax_rows(s, G, n, ld, m, l);
  float a[G][D] = {};
  for (int64_t t = 0; t < n; ++t) {
    const float* v = vals + t * D;
    for (int g = 0; g < G; ++g) {
      const float w = s[g * ld + t];
      for (int i = 0; i < D; ++i) a[g][i] += w * v[i];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < D; ++i) acc[g * D + i] = a[g][i];
}

// float_task, on the compile-time loop for the common shapes (groups of 1-8 query heads, widths 64 and 128)
inline void any_float_task(const float* __restrict q, int64_t g_heads, const float* __restrict keys,
                           const float* __restrict vals, int64_t n, int64_t d, float cap, float* s, int64_t ld,
                           float* m, float* l, float* acc) {
#define LONGREACH_FIXED(G, D) \
  if (g_heads == G && d == D) return float_task_fixed<G, D>(q, keys, vals, n, cap, s, ld, m, l, acc);
#define LONGREACH_FIXED_D(D) LONGREACH_FIXED(1, D) LONGREACH_FIXED(2, D) LONGREACH_FIXED(3, D) \
  LONGREACH_FIXED(4, D) LONGREACH_FIXED(5, D) LONGREACH_FIXED(6, D) LONGREACH_FIXED(7, D) LONGREACH_FIXED(8, D)
  LONGREACH_FIXED_D(64)
  LONGREACH_FIXED_D(128)
#undef LONGREACH_FIXED_D
#undef LONGREACH_FIXED
  float_task(q, g_heads, keys, vals, n, d, cap, s, ld, m, l, acc);
}

// Each query head's tasks merged by log-sum-exp: tasks of one (batch, KV head) are consecutive, per_head of them,
// each holding g_heads rows of (m, l, acc). Writes out (n_bh * g_heads, d) and lse (n_bh * g_heads).
inline void merge_tasks(const float* part_m, const float* part_l, const float* part_acc, int64_t n_bh,
                        int64_t per_head, int64_t g_heads, int64_t d, float* out, float* lse) {
  for (int64_t bh = 0; bh < n_bh; ++bh) {
    for (int64_t g = 0; g < g_heads; ++g) {
      const int64_t first = bh * per_head;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < per_head; ++c) top = std::max(top, part_m[(first + c) * g_heads + g]);
      float total = 0.f;
      float* o = out + (bh * g_heads + g) * d;
      std::fill(o, o + d, 0.f);
      for (int64_t c = 0; c < per_head; ++c) {
        const int64_t at = (first + c) * g_heads + g;
        const float w = std::exp(part_m[at] - top);
        total += w * part_l[at];
        axpy(o, part_acc + at * d, w, 0, d);
      }
      for (int64_t i = 0; i < d; ++i) o[i] /= total;
      lse[bh * g_heads + g] = top + std::log(total);
    }
  }
}

}  // namespace longreach
