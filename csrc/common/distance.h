// Exact squared distances for re-scoring candidates: difference first, then square, accumulated
// in double. The fast expansion |x|^2 + |y|^2 - 2 x.y loses about eps * |x| |y| to cancellation,
// which 1 / (2 sigma^2) magnifies at small sigma (docs/design.md, Numerics).
#pragma once
#include <cstdint>

namespace diffcore {

// Element values in double. uint8 images map to [-1, 1] as u / 127.5 - 1 (the convention of every
// op taking uint8), evaluated in double exactly as the float64 references evaluate it: a float
// mapping would round once more, which 1 / (2 sigma^2) magnifies at near-ties.
inline double value_as_double(float v) { return v; }
inline double value_as_double(double v) { return v; }
inline double value_as_double(uint8_t v) { return static_cast<double>(v) / 127.5 - 1.0; }

// |x - y|^2 over `dim` elements of two rows (float, double or uint8 each).
template <typename TX, typename TY>
inline double exact_sqdist(const TX* x, const TY* y, int64_t dim) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + kLanes <= dim; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) {
      const double diff = value_as_double(x[i + l]) - value_as_double(y[i + l]);
      acc[l] += diff * diff;
    }
  }
  double total = 0;
  for (; i < dim; ++i) {
    const double diff = value_as_double(x[i]) - value_as_double(y[i]);
    total += diff * diff;
  }
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

}  // namespace diffcore
