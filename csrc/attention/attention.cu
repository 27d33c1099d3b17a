// CUDA attention: forward and fused forward + JVP (simple tiled shared-memory kernels, fp32 state).
//
// One warp per query row, WARPS rows per block. Keys and values are staged in shared memory in
// tiles of BN = 32 keys (converted to fp32, rows padded to D + 1 floats against bank conflicts).
// Per tile each lane scores one key (S = q . k_j * scale; with the JVP also
// tS = (tq . k_j + q . tk_j) * scale), the warp updates the online softmax (running max m, row sum
// l, and for the JVP the running rowsum r of p * tS, all rescaled by exp(m_old - m_new)), then each
// lane accumulates its D / 32 output dims over the tile's 32 keys:
//   acc  += p_j v_j,      acc_t += p_j tv_j + (p_j tS_j) v_j.
// At the end O = acc / l, tO = acc_t / l - (r / l) O, lse = m + log l
// (docs/design.md, Numerics; Lu & Song 2024, App. F). D <= 256.
#include <cuda_runtime.h>

#include <cmath>

#include "attention/attention_cuda.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.h"

namespace diffcore {
namespace {

constexpr int kWarps = 8;
constexpr int kTile = 32;        // keys per shared-memory tile (one per lane)
constexpr int kMaxChunks = 8;    // D / 32 output dims per lane, D <= 256
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFull, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ float load_or_zero(const T* p, long long i, bool ok) {
  return (ok && p != nullptr) ? to_float(p[i]) : 0.0f;
}

template <typename T, bool kJvp>
__global__ void attention_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                     const T* __restrict__ tq, const T* __restrict__ tk, const T* __restrict__ tv,
                                     T* __restrict__ o, T* __restrict__ to, float* __restrict__ lse,
                                     int lq, int lk, int d, float scale) {
  extern __shared__ float smem[];
  const int dp = d + 1;
  float* sk = smem;
  float* sv = sk + kTile * dp;
  float* stk = sv + kTile * dp;                      // JVP only
  float* stv = stk + (kJvp ? kTile * dp : 0);        // JVP only
  float* sq = stv + (kJvp ? kTile * dp : 0);         // kWarps x d
  float* stq = sq + kWarps * d;                      // JVP only

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const long long bh = blockIdx.y;
  const int row = blockIdx.x * kWarps + warp;
  const bool active = row < lq;
  const long long qbase = (bh * lq + (active ? row : 0)) * d;
  for (int c = lane; c < d; c += 32) {
    sq[warp * d + c] = load_or_zero(q, qbase + c, active);
    if (kJvp) stq[warp * d + c] = load_or_zero(tq, qbase + c, active);
  }

  float acc[kMaxChunks], acc_t[kMaxChunks];
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) acc[c] = acc_t[c] = 0.0f;
  float m = -INFINITY, l = 0.0f, r = 0.0f;

  for (int n0 = 0; n0 < lk; n0 += kTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kTile * d; idx += blockDim.x) {
      const int j = idx / d, c = idx % d;
      const bool ok = n0 + j < lk;
      const long long g = (bh * lk + (ok ? n0 + j : 0)) * d + c;
      sk[j * dp + c] = load_or_zero(k, g, ok);
      sv[j * dp + c] = load_or_zero(v, g, ok);
      if (kJvp) {
        stk[j * dp + c] = load_or_zero(tk, g, ok);
        stv[j * dp + c] = load_or_zero(tv, g, ok);
      }
    }
    __syncthreads();

    const bool col_ok = n0 + lane < lk;
    float s = 0.0f, t_s = 0.0f;
    const float* qrow = sq + warp * d;
    const float* krow = sk + lane * dp;
    for (int c = 0; c < d; ++c) {
      s = fmaf(qrow[c], krow[c], s);
      if (kJvp) t_s = fmaf(stq[warp * d + c], krow[c], fmaf(qrow[c], stk[lane * dp + c], t_s));
    }
    s = col_ok ? s * scale : -INFINITY;
    t_s *= scale;
    const float m_new = fmaxf(m, warp_max(s));
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf, m_new finite)
    const float p = col_ok ? expf(s - m_new) : 0.0f;
    const float p_ts = p * t_s;
    l = l * alpha + warp_sum(p);
    if (kJvp) r = r * alpha + warp_sum(p_ts);
#pragma unroll
    for (int c = 0; c < kMaxChunks; ++c) {
      acc[c] *= alpha;
      if (kJvp) acc_t[c] *= alpha;
    }
    const int n_valid = min(kTile, lk - n0);
    for (int j = 0; j < n_valid; ++j) {
      const float pj = __shfl_sync(kFull, p, j);
      const float ptsj = kJvp ? __shfl_sync(kFull, p_ts, j) : 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxChunks; ++c) {
        const int col = lane + 32 * c;
        if (col < d) {
          const float vj = sv[j * dp + col];
          acc[c] = fmaf(pj, vj, acc[c]);
          if (kJvp) acc_t[c] = fmaf(pj, stv[j * dp + col], fmaf(ptsj, vj, acc_t[c]));
        }
      }
    }
    m = m_new;
  }

  if (!active) return;
  const float inv_l = 1.0f / l;
#pragma unroll
  for (int c = 0; c < kMaxChunks; ++c) {
    const int col = lane + 32 * c;
    if (col < d) {
      const float out = acc[c] * inv_l;
      o[qbase + col] = from_math<T>(out);
      if (kJvp) to[qbase + col] = from_math<T>(acc_t[c] * inv_l - (r * inv_l) * out);
    }
  }
  if (lane == 0) lse[bh * lq + row] = m + logf(l);
}

template <typename T>
void launch(std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t tq, std::uintptr_t tk,
            std::uintptr_t tv, std::uintptr_t o, std::uintptr_t to, std::uintptr_t lse, int64_t bh,
            int64_t lq, int64_t lk, int64_t d, float scale, bool jvp, cudaStream_t stream) {
  const int tiles = jvp ? 4 : 2;
  const size_t smem = sizeof(float) * (size_t(tiles) * kTile * (d + 1) + size_t(jvp ? 2 : 1) * kWarps * d);
  const dim3 grid(unsigned((lq + kWarps - 1) / kWarps), unsigned(bh));
  const dim3 block(kWarps * 32);
  auto args = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    kernel<<<grid, block, smem, stream>>>(
        reinterpret_cast<const T*>(q), reinterpret_cast<const T*>(k), reinterpret_cast<const T*>(v),
        reinterpret_cast<const T*>(tq), reinterpret_cast<const T*>(tk), reinterpret_cast<const T*>(tv),
        reinterpret_cast<T*>(o), reinterpret_cast<T*>(to), reinterpret_cast<float*>(lse),
        int(lq), int(lk), int(d), scale);
  };
  if (jvp) {
    args(attention_fwd_kernel<T, true>);
  } else {
    args(attention_fwd_kernel<T, false>);
  }
  check_cuda_launch(jvp ? "attention_forward_jvp" : "attention_forward");
}

}  // namespace

void attention_forward_cuda(DType dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                            std::uintptr_t tq, std::uintptr_t tk, std::uintptr_t tv,
                            std::uintptr_t o, std::uintptr_t to, std::uintptr_t lse,
                            int64_t bh, int64_t lq, int64_t lk, int64_t d, float scale, bool jvp,
                            int device, std::uintptr_t stream) {
  CudaDeviceGuard guard(device);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<float, __half, __nv_bfloat16>(dtype, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch<T>(q, k, v, tq, tk, tv, o, to, lse, bh, lq, lk, d, scale, jvp, s);
  });
}

}  // namespace diffcore
