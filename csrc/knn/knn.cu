// CUDA exact k-NN (l2): fp32 difference-first distance tiles screen, exact double re-scoring of
// the survivors, per-query top-k ordered by (distance, index). Simple rather than fast: it has not
// run on a GPU yet, so diffcore's auto dispatch does not pick it (docs/design.md, Backends and auto).
//
// Per training tile of `tile` rows:
//   1. approx_tile_kernel: a[b, j] = sum_i fl(fl(q_i - y~_i)^2) in fp32 (16 x 16 shared-memory tiles),
//      y~ = y (float32) or fl32(u * (1/127.5) - 1) (uint8).
//      Error (u = 2^-24, sequential fp32 sums, gamma_D = D u / (1 - D u)):
//        float32: |a - d^2| <= (gamma_D + 3u) d^2 (1 + O(u))
//        uint8:   one more |y~_i - y_i| <= 6u per element, so in addition
//                 sum 2 |q_i - y_i| 6u (1+u) + (6u)^2 <= 6.1u (D + d^2)   (2|x| <= 1 + x^2)
//      slack = 2 (gamma_D + 4u) a + [uint8] 2 (7u) (D + a): a safety factor of about 2 on both.
//   2. screen_rescore_kernel (one block per query): the k-th smallest upper bound a + slack of the
//      tile caps the cut; every row with a - slack <= cut is re-scored exactly in double
//      (difference first; uint8 as u / 127.5 - 1 in double, as the reference) and inserted into the
//      top-k in shared memory. The final top-k is the k smallest (d^2, index) pairs whatever the
//      order of insertion, so the atomics that build the candidate list do not change the result.
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.h"
#include "knn/knn_cuda.h"

namespace diffcore {
namespace {

constexpr int kTileSide = 16;
constexpr int kScreenThreads = 128;

// approx[b, j] (row stride `tile`) for queries b in [0, batch) and rows tile_start + j, j < rows.
template <typename TY>
__global__ void approx_tile_kernel(const float* __restrict__ queries, const TY* __restrict__ train, int64_t batch,
                                   int64_t dim, int64_t tile_start, int64_t rows, int64_t tile,
                                   float* __restrict__ approx) {
  __shared__ float q_s[kTileSide][kTileSide + 1];
  __shared__ float y_s[kTileSide][kTileSide + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kTileSide;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTileSide;
  float acc = 0.0f;
  for (int64_t d0 = 0; d0 < dim; d0 += kTileSide) {
    const int64_t col = d0 + tx;
    const bool col_ok = col < dim;
    q_s[ty][tx] = (b0 + ty < batch && col_ok) ? queries[(b0 + ty) * dim + col] : 0.0f;
    y_s[ty][tx] = (j0 + ty < rows && col_ok) ? to_float(train[(tile_start + j0 + ty) * dim + col]) : 0.0f;
    __syncthreads();
    const int width = static_cast<int>(dim - d0 < kTileSide ? dim - d0 : kTileSide);
    for (int c = 0; c < width; ++c) {
      const float diff = q_s[ty][c] - y_s[tx][c];
      acc = fmaf(diff, diff, acc);
    }
    __syncthreads();
  }
  const int64_t b = b0 + ty, j = j0 + tx;
  if (b < batch && j < rows) approx[b * tile + j] = acc;
}

__device__ __forceinline__ bool pair_less(double d_a, int64_t i_a, double d_b, int64_t i_b) {
  return d_a < d_b || (d_a == d_b && i_a < i_b);
}

template <typename TY>
__global__ void screen_rescore_kernel(const float* __restrict__ queries, const TY* __restrict__ train,
                                      int64_t dim, int64_t k, int64_t tile_start, int64_t rows, int64_t tile,
                                      const float* __restrict__ approx, double rel_slack, double abs_slack,
                                      double* __restrict__ best_d2, int64_t* __restrict__ best_idx) {
  __shared__ double top_d2[kKnnCudaMaxK];
  __shared__ int64_t top_idx[kKnnCudaMaxK];
  __shared__ double red_value[kScreenThreads];
  __shared__ int red_owner[kScreenThreads];
  __shared__ int candidates[kScreenThreads];
  __shared__ int n_candidates;
  __shared__ double cut;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const float* a_row = approx + b * tile;
  const float* q = queries + b * dim;
  if (tid < k) {
    top_d2[tid] = best_d2[b * k + tid];
    top_idx[tid] = best_idx[b * k + tid];
  }

  // 1. Per thread, its k smallest upper bounds (sorted); then k block-wide rounds pop the
  //    smallest head: the k-th popped value is the tile's k-th smallest upper bound.
  double mine[kKnnCudaMaxK];
  for (int s = 0; s < kKnnCudaMaxK; ++s) mine[s] = INFINITY;
  for (int64_t j = tid; j < rows; j += kScreenThreads) {
    const double a = a_row[j];
    const double upper = a + rel_slack * a + abs_slack;
    if (upper < mine[k - 1]) {
      int pos = static_cast<int>(k) - 1;
      while (pos > 0 && upper < mine[pos - 1]) {
        mine[pos] = mine[pos - 1];
        --pos;
      }
      mine[pos] = upper;
    }
  }
  int head = 0;
  double kth_upper = INFINITY;
  for (int64_t round = 0; round < k; ++round) {
    red_value[tid] = head < k ? mine[head] : INFINITY;
    red_owner[tid] = tid;
    __syncthreads();
    for (int stride = kScreenThreads / 2; stride > 0; stride >>= 1) {
      if (tid < stride && red_value[tid + stride] < red_value[tid]) {
        red_value[tid] = red_value[tid + stride];
        red_owner[tid] = red_owner[tid + stride];
      }
      __syncthreads();
    }
    kth_upper = red_value[0];
    if (red_owner[0] == tid) ++head;
    __syncthreads();
  }
  if (tid == 0) {
    cut = fmin(top_d2[k - 1], kth_upper);
    n_candidates = 0;
  }
  __syncthreads();

  // 2. Candidates chunk by chunk; each re-scored exactly by the whole block.
  for (int64_t j0 = 0; j0 < rows; j0 += kScreenThreads) {
    const int64_t j = j0 + tid;
    if (j < rows) {
      const double a = a_row[j];
      const double lower = a - rel_slack * a - abs_slack;
      if (lower <= cut) candidates[atomicAdd(&n_candidates, 1)] = static_cast<int>(j);
    }
    __syncthreads();
    const int count = n_candidates;
    for (int c = 0; c < count; ++c) {
      const int64_t row = tile_start + candidates[c];
      double partial = 0.0;
      for (int64_t i = tid; i < dim; i += kScreenThreads) {
        const double diff = static_cast<double>(q[i]) - to_double(train[row * dim + i]);
        partial += diff * diff;
      }
      red_value[tid] = partial;
      __syncthreads();
      for (int stride = kScreenThreads / 2; stride > 0; stride >>= 1) {
        if (tid < stride) red_value[tid] += red_value[tid + stride];
        __syncthreads();
      }
      if (tid == 0) {
        const double d2 = red_value[0];
        if (pair_less(d2, row, top_d2[k - 1], top_idx[k - 1])) {
          int64_t pos = k - 1;
          while (pos > 0 && pair_less(d2, row, top_d2[pos - 1], top_idx[pos - 1])) {
            top_d2[pos] = top_d2[pos - 1];
            top_idx[pos] = top_idx[pos - 1];
            --pos;
          }
          top_d2[pos] = d2;
          top_idx[pos] = row;
          cut = fmin(cut, top_d2[k - 1]);
        }
      }
      __syncthreads();
    }
    if (tid == 0) n_candidates = 0;
    __syncthreads();
  }
  if (tid < k) {
    best_d2[b * k + tid] = top_d2[tid];
    best_idx[b * k + tid] = top_idx[tid];
  }
}

template <typename TY>
void launch_all(const float* queries, const TY* train, int64_t batch, int64_t n_train, int64_t dim, int64_t k,
                int64_t tile, float* workspace, double* best_d2, int64_t* best_idx, cudaStream_t stream) {
  const double unit = std::ldexp(1.0, -24);
  const double dim_u = static_cast<double>(dim) * unit;
  const double gamma = dim_u / (1.0 - dim_u);
  constexpr bool kUint8 = std::is_same<TY, uint8_t>::value;
  const double rel_slack = 2.0 * (gamma + 4.0 * unit) + (kUint8 ? 14.0 * unit : 0.0);
  const double abs_slack = kUint8 ? 14.0 * unit * static_cast<double>(dim) : 0.0;
  for (int64_t start = 0; start < n_train; start += tile) {
    const int64_t rows = (n_train - start < tile) ? n_train - start : tile;
    const dim3 block(kTileSide, kTileSide);
    const dim3 grid(static_cast<unsigned>((batch + kTileSide - 1) / kTileSide),
                    static_cast<unsigned>((rows + kTileSide - 1) / kTileSide));
    approx_tile_kernel<TY><<<grid, block, 0, stream>>>(queries, train, batch, dim, start, rows, tile, workspace);
    check_cuda_launch("knn approx_tile_kernel");
    screen_rescore_kernel<TY><<<static_cast<unsigned>(batch), kScreenThreads, 0, stream>>>(
        queries, train, dim, k, start, rows, tile, workspace, rel_slack, abs_slack, best_d2, best_idx);
    check_cuda_launch("knn screen_rescore_kernel");
  }
}

}  // namespace

void knn_cuda_launch(const float* queries, const void* train, DType train_dtype, int64_t batch, int64_t n_train,
                     int64_t dim, int64_t k, int64_t tile, float* workspace, double* best_d2, int64_t* best_idx,
                     int device, void* stream) {
  CudaDeviceGuard guard(device);
  auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype<float, uint8_t>(train_dtype, "train", [&](auto tag) {
    using TY = typename decltype(tag)::type;
    launch_all<TY>(queries, static_cast<const TY*>(train), batch, n_train, dim, k, tile, workspace, best_d2, best_idx,
                   s);
  });
}

}  // namespace diffcore
