// Host launch function of the CUDA empirical denoiser (empirical_denoise.cu). Plain C++ types only:
// the caller (empirical_denoise.cpp) validated pointers and sizes; Python allocated every buffer.
#pragma once
#include <cstdint>

#include "common/checks.h"

namespace diffcore {

// x [batch, dim] (float32/float16/bfloat16), train [rows, dim]
// (float32/float16/bfloat16/uint8 as u/127.5-1), inv2s2 [batch] = 1 / (2 sigma^2) (double).
// The training set is split into `splits` contiguous ranges; each (query group, split) block keeps a
// running max / sum and a partial accumulator in work_acc [splits, batch, dim] (float),
// work_m / work_s [splits, batch] (double); a merge kernel combines them into out [batch, dim]
// (x's dtype) and logz [batch] (float). Distances are exact: difference first, double accumulation.
// Runs on `device` (made current for the launch) on `stream` (a cudaStream_t).
void empirical_denoise_cuda_forward(const void* x, DType x_dtype, const void* train, DType train_dtype,
                                    const double* inv2s2, int64_t batch, int64_t rows, int64_t dim,
                                    int64_t splits, float* work_acc, double* work_m, double* work_s, void* out,
                                    float* logz, int device, void* stream);

}  // namespace diffcore
