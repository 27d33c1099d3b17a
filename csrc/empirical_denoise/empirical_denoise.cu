// CUDA empirical optimal denoiser: exact distances, split over the training set, log-sum-exp merge.
//
// out_b = sum_i softmax_i(l_bi) y_i with l_bi = -|x_b - y_i|^2 / (2 sigma_b^2), logz_b = lse_i l_bi.
// Kept simple and exact rather than fast: every distance is computed difference first with double
// accumulation (no |x|^2 + |y|^2 - 2 x.y cancellation, docs/design.md, Numerics), so no re-scoring is needed.
//
// partial_kernel, grid (query groups of kQueries, splits): each block streams its contiguous range of
// training rows in tiles of kRows; the kQueries x kRows distances of a tile come from D-chunks staged
// in shared memory (one pair per thread); one thread per query runs the online softmax (running max
// m, running sum s in double); the fp32 accumulator acc[split, b, :] (global memory, owned by this
// block) becomes acc * alpha + sum_n p_n y_n, skipped for queries whose tile weights are all zero.
// merge_kernel, one block per query: combines the splits (flash-decoding style).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.h"
#include "empirical_denoise/empirical_denoise_cuda.h"

namespace diffcore {
namespace {

constexpr int kQueries = 16;  // queries per block
constexpr int kRows = 16;     // training rows per tile
constexpr int kChunk = 64;    // feature chunk staged in shared memory
constexpr int kThreads = kQueries * kRows;

template <typename TX, typename TY>
__global__ void partial_kernel(const TX* __restrict__ x, const TY* __restrict__ train, const double* __restrict__ inv2s2, int64_t batch, int64_t rows, int64_t dim,
                               int64_t rows_per_split, float* __restrict__ work_acc, double* __restrict__ work_m,
                               double* __restrict__ work_s) {
  __shared__ double xs[kQueries][kChunk];
  __shared__ double ys[kRows][kChunk + 1];
  __shared__ double logit[kQueries][kRows];
  __shared__ float weight[kQueries][kRows];
  __shared__ float alpha[kQueries];
  __shared__ int active[kQueries];

  const int tid = threadIdx.x;
  const int q = tid / kRows;  // pair (q, n) of this thread in the distance phase
  const int n = tid % kRows;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kQueries;
  const int64_t split = blockIdx.y;
  const int64_t row_begin = split * rows_per_split;
  const int64_t row_end = rows < row_begin + rows_per_split ? rows : row_begin + rows_per_split;
  float* acc = work_acc + (split * batch) * dim;

  double run_max = -INFINITY, run_sum = 0.0;  // valid in threads tid < kQueries (query tid)

  for (int64_t i = tid; i < static_cast<int64_t>(kQueries) * dim; i += kThreads) {
    const int64_t qq = i / dim, d = i % dim;
    if (b0 + qq < batch) acc[(b0 + qq) * dim + d] = 0.0f;
  }

  for (int64_t tile = row_begin; tile < row_end; tile += kRows) {
    // 1. exact squared distances of the kQueries x kRows pairs
    double dist = 0.0;
    for (int64_t k0 = 0; k0 < dim; k0 += kChunk) {
      for (int i = tid; i < kQueries * kChunk; i += kThreads) {
        const int qq = i / kChunk, kk = i % kChunk;
        const int64_t b = b0 + qq, d = k0 + kk;
        xs[qq][kk] = (b < batch && d < dim) ? to_double(x[b * dim + d]) : 0.0;
      }
      for (int i = tid; i < kRows * kChunk; i += kThreads) {
        const int nn = i / kChunk, kk = i % kChunk;
        const int64_t r = tile + nn, d = k0 + kk;
        ys[nn][kk] = (r < row_end && d < dim) ? to_double(train[r * dim + d]) : 0.0;
      }
      __syncthreads();
      const int limit = dim - k0 < kChunk ? static_cast<int>(dim - k0) : kChunk;
      for (int kk = 0; kk < limit; ++kk) {
        const double diff = xs[q][kk] - ys[n][kk];
        dist = fma(diff, diff, dist);
      }
      __syncthreads();
    }
    const bool pair_ok = (b0 + q < batch) && (tile + n < row_end);
    logit[q][n] = pair_ok ? -dist * inv2s2[b0 + q] : -INFINITY;
    __syncthreads();

    // 2. online softmax, one thread per query
    if (tid < kQueries) {
      double tile_max = -INFINITY;
      for (int j = 0; j < kRows; ++j) tile_max = fmax(tile_max, logit[tid][j]);
      const double new_max = fmax(run_max, tile_max);
      const double a = (run_max == -INFINITY) ? 0.0 : exp(run_max - new_max);
      double sum = 0.0;
      int any = 0;
      for (int j = 0; j < kRows; ++j) {
        const float p = (logit[tid][j] == -INFINITY) ? 0.0f : static_cast<float>(exp(logit[tid][j] - new_max));
        weight[tid][j] = p;
        sum += static_cast<double>(p);
        any |= (p != 0.0f);
      }
      run_sum = run_sum * a + sum;
      run_max = new_max;
      alpha[tid] = static_cast<float>(a);
      active[tid] = any || (a != 1.0);
    }
    __syncthreads();

    // 3. acc = acc * alpha + P @ Y for the queries with any weight (small sigma: few)
    for (int qq = 0; qq < kQueries; ++qq) {
      if (!active[qq] || b0 + qq >= batch) continue;
      float* arow = acc + (b0 + qq) * dim;
      for (int64_t d = tid; d < dim; d += kThreads) {
        float value = arow[d] * alpha[qq];
        for (int j = 0; j < kRows; ++j) {
          const float w = weight[qq][j];
          if (w != 0.0f) value += w * static_cast<float>(to_double(train[(tile + j) * dim + d]));
        }
        arow[d] = value;
      }
    }
    __syncthreads();
  }
  if (tid < kQueries && b0 + tid < batch) {
    work_m[split * batch + b0 + tid] = run_max;
    work_s[split * batch + b0 + tid] = run_sum;
  }
}

template <typename TX>
__global__ void merge_kernel(const float* __restrict__ work_acc, const double* __restrict__ work_m,
                             const double* __restrict__ work_s, int64_t batch, int64_t dim, int64_t splits,
                             TX* __restrict__ out, float* __restrict__ logz) {
  const int64_t b = blockIdx.x;
  double m = -INFINITY;
  for (int64_t s = 0; s < splits; ++s) m = fmax(m, work_m[s * batch + b]);
  double total = 0.0;
  for (int64_t s = 0; s < splits; ++s) {
    const double ms = work_m[s * batch + b];
    if (ms != -INFINITY) total += work_s[s * batch + b] * exp(ms - m);
  }
  for (int64_t d = threadIdx.x; d < dim; d += blockDim.x) {
    double value = 0.0;
    for (int64_t s = 0; s < splits; ++s) {
      const double ms = work_m[s * batch + b];
      if (ms != -INFINITY) value += static_cast<double>(work_acc[(s * batch + b) * dim + d]) * exp(ms - m);
    }
    out[b * dim + d] = from_math<TX>(static_cast<float>(value / total));
  }
  if (threadIdx.x == 0) logz[b] = static_cast<float>(m + log(total));
}

}  // namespace

void empirical_denoise_cuda_forward(const void* x, DType x_dtype, const void* train, DType train_dtype,
                                    const double* inv2s2, int64_t batch, int64_t rows, int64_t dim,
                                    int64_t splits, float* work_acc, double* work_m, double* work_s, void* out,
                                    float* logz, int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int64_t rows_per_split = (rows + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((batch + kQueries - 1) / kQueries), static_cast<unsigned>(splits));
  dispatch_dtype<float, __half, __nv_bfloat16>(x_dtype, "x_dtype", [&](auto x_tag) {
    using TX = typename decltype(x_tag)::type;
    dispatch_dtype<float, __half, __nv_bfloat16, uint8_t>(train_dtype, "train_dtype", [&](auto y_tag) {
      using TY = typename decltype(y_tag)::type;
      partial_kernel<TX, TY><<<grid, kThreads, 0, cuda_stream>>>(static_cast<const TX*>(x),
                                                                static_cast<const TY*>(train), inv2s2, batch, rows,
                                                                dim, rows_per_split, work_acc, work_m, work_s);
    });
    check_cuda_launch("empirical_denoise partial_kernel");
    merge_kernel<TX><<<static_cast<unsigned>(batch), 256, 0, cuda_stream>>>(work_acc, work_m, work_s, batch, dim,
                                                                            splits, static_cast<TX*>(out), logz);
    check_cuda_launch("empirical_denoise merge_kernel");
  });
}

}  // namespace diffcore
