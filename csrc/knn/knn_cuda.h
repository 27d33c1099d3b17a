// Host launch function of the CUDA exact k-NN (csrc/knn/knn.cu). Plain C++ types only: the
// op's .cpp calls it under DIFFCORE_WITH_CUDA.
#pragma once
#include <cstdint>

#include "common/checks.h"

namespace diffcore {

// Largest k the CUDA kernel keeps per query (per-block top-k in shared memory).
constexpr int64_t kKnnCudaMaxK = 16;

#ifdef DIFFCORE_WITH_CUDA
// queries: float32 [batch, dim]; train: float32 or uint8 (u / 127.5 - 1) [n_train, dim], rows
// contiguous, on `device` (made current for the launch). workspace: float32 [batch * tile].
// best_d2 / best_idx: [batch, k], filled with the k smallest exact squared distances (double) and
// their indices, ordered by (distance, index). stream: a cudaStream_t (0 = default stream).
void knn_cuda_launch(const float* queries, const void* train, DType train_dtype, int64_t batch, int64_t n_train,
                     int64_t dim, int64_t k, int64_t tile, float* workspace, double* best_d2, int64_t* best_idx,
                     int device, void* stream);
#endif

}  // namespace diffcore
