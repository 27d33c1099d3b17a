// Host launch functions of the CUDA local denoisers (local_denoise.cu). Plain C++ types only: the
// caller (local_denoise.cpp) validated pointers and sizes; Python allocated every buffer. Both
// update the running state (dmin, total [Q] and acc, float64) of one training tile in place, with
// the same layouts as the CPU kernels except the els tile, image-major [T, C, H+P-1, W+P-1].
#pragma once
#include <cstdint>

namespace diffcore {

void local_denoise_translated_cuda(const float* xq, const float* y, int64_t batch, int64_t tile, int64_t channels,
                                   int64_t height, int64_t width, int64_t patch, const int32_t* row_lo,
                                   const int32_t* row_hi, const int32_t* col_lo, const int32_t* col_hi,
                                   const double* inv2s2, double band, double* dmin, double* total, double* acc,
                                   int device, void* stream);

void local_denoise_same_location_cuda(const float* x, const float* y, int64_t batch, int64_t tile, int64_t channels,
                                      int64_t pixels, int64_t locations, const int64_t* support_offsets,
                                      const int32_t* support_index, const float* support_weight,
                                      const int64_t* out_offsets, const int32_t* out_index, const double* inv2s2,
                                      double band, double* dmin, double* total, double* acc, int device,
                                      void* stream);

}  // namespace diffcore
