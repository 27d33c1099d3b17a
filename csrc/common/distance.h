// Exact squared distances for re-scoring candidates: difference first, then square, accumulated
// in double. The fast expansion |x|^2 + |y|^2 - 2 x.y loses about eps * |x| |y| to cancellation,
// which 1 / (2 sigma^2) magnifies at small sigma (DESIGN.md, Numerics).
#pragma once
#include <cstdint>

namespace diffcore {

// uint8 images map to [-1, 1] as u / 127.5 - 1 (the convention of every op taking uint8).
inline float pixel_value(float v) { return v; }
inline float pixel_value(uint8_t v) { return static_cast<float>(v) * (1.0f / 127.5f) - 1.0f; }

template <typename T>
inline double exact_sqdist(const float* x, const T* y, int64_t dim) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double diff = static_cast<double>(x[i + l]) - static_cast<double>(pixel_value(y[i + l]));
      acc[l] += diff * diff;
    }
  }
  double total = 0;
  for (; i < dim; ++i) {
    const double diff = static_cast<double>(x[i]) - static_cast<double>(pixel_value(y[i]));
    total += diff * diff;
  }
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

}  // namespace diffcore
