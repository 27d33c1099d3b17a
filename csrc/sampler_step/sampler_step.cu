// Fused sampler step on CUDA: one elementwise pass per solver step, coefficients passed by value
// (they are host constants of the schedule), so the loop never synchronizes with the host and a
// whole trajectory can be captured into a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_utils.h"
#include "sampler_step/sampler_step_cuda.h"

namespace diffcore {
namespace {

template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename MathOf<T>::type load(const T* p, int64_t i) {
  return static_cast<typename MathOf<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T, typename M> __device__ __forceinline__ T store_cast(M v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half store_cast<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 store_cast<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T, bool HasE, bool HasZ, bool HasFlag>
__global__ void sampler_step_kernel(const T* x, const T* __restrict__ d, const T* __restrict__ e,
                                    const T* __restrict__ z, T* out, int64_t n, double c_x, double c_d,
                                    double c_e, double c_z, int32_t step, int32_t* flag) {
  using M = typename MathOf<T>::type;
  const M cx = static_cast<M>(c_x), cd = static_cast<M>(c_d), ce = static_cast<M>(c_e), cz = static_cast<M>(c_z);
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const M dv = load(d, i);
    M acc = cd * dv;                       // same association as the CPU kernel
    if (HasE) acc = fma(ce, load(e, i), acc);
    if (HasZ) acc = fma(cz, load(z, i), acc);
    acc = fma(cx, load(x, i), acc);
    const T stored = store_cast<T, M>(acc);
    out[i] = stored;
    if (HasFlag) bad |= !isfinite(dv) || !isfinite(static_cast<M>(load(&stored, 0)));
  }
  if (HasFlag && __syncthreads_or(bad) && threadIdx.x == 0) atomicMin(flag, step);
}

template <typename T, bool HasE, bool HasZ>
void launch_flag(const void* x, const void* d, const void* e, const void* z, void* out, int64_t n, double cx,
                 double cd, double ce, double cz, int32_t step, int32_t* flag, cudaStream_t stream) {
  const int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 4096) blocks = 4096;  // grid-stride beyond that
  if (flag != nullptr) {
    sampler_step_kernel<T, HasE, HasZ, true><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(d), static_cast<const T*>(e), static_cast<const T*>(z),
        static_cast<T*>(out), n, cx, cd, ce, cz, step, flag);
  } else {
    sampler_step_kernel<T, HasE, HasZ, false><<<static_cast<int>(blocks), threads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(d), static_cast<const T*>(e), static_cast<const T*>(z),
        static_cast<T*>(out), n, cx, cd, ce, cz, step, flag);
  }
}

template <typename T>
void launch_typed(const void* x, const void* d, const void* e, const void* z, void* out, int64_t n, double cx,
                  double cd, double ce, double cz, int32_t step, int32_t* flag, cudaStream_t stream) {
  if (e && z) launch_flag<T, true, true>(x, d, e, z, out, n, cx, cd, ce, cz, step, flag, stream);
  else if (e) launch_flag<T, true, false>(x, d, e, z, out, n, cx, cd, ce, cz, step, flag, stream);
  else if (z) launch_flag<T, false, true>(x, d, e, z, out, n, cx, cd, ce, cz, step, flag, stream);
  else launch_flag<T, false, false>(x, d, e, z, out, n, cx, cd, ce, cz, step, flag, stream);
}

}  // namespace

void sampler_step_cuda_launch(int dtype, std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z,
                              std::uintptr_t out, int64_t n, double c_x, double c_d, double c_e, double c_z,
                              int32_t step, std::uintptr_t flag, std::uintptr_t stream) {
  auto* xp = reinterpret_cast<const void*>(x);
  auto* dp = reinterpret_cast<const void*>(d);
  auto* ep = reinterpret_cast<const void*>(e);
  auto* zp = reinterpret_cast<const void*>(z);
  auto* op = reinterpret_cast<void*>(out);
  auto* fp = reinterpret_cast<int32_t*>(flag);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: launch_typed<float>(xp, dp, ep, zp, op, n, c_x, c_d, c_e, c_z, step, fp, s); break;
    case 1: launch_typed<double>(xp, dp, ep, zp, op, n, c_x, c_d, c_e, c_z, step, fp, s); break;
    case 2: launch_typed<__half>(xp, dp, ep, zp, op, n, c_x, c_d, c_e, c_z, step, fp, s); break;
    case 3: launch_typed<__nv_bfloat16>(xp, dp, ep, zp, op, n, c_x, c_d, c_e, c_z, step, fp, s); break;
    default: break;  // validated by the caller
  }
  check_cuda_launch("sampler_step");
}

}  // namespace diffcore
