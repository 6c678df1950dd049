// Arithmetic the compiled kernels share. Header-only and inline so that loops calling it vectorise in each
// translation unit (native.py hashes this file into the build flags: torch rebuilds when it changes).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace longreach {

// exp(x) for x <= 0 as 2^n * 2^f with a degree-6 polynomial for 2^f on [0, 1) (relative error ~2e-7).
// Plain arithmetic so that loops calling it vectorise; libm's expf made the block-sparse kernel 1.8x slower.
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

}  // namespace longreach
