// Fused sampler step on CUDA: one elementwise pass per solver step, coefficients passed by value
// (they are host constants of the schedule), so the loop never synchronizes with the host and a
// whole trajectory can be captured into a CUDA graph.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.h"
#include "sampler_step/sampler_step_cuda.h"

namespace diffcore {
namespace {

template <typename T, bool HasE, bool HasZ, bool HasFlag>
__global__ void sampler_step_kernel(const T* x, const T* __restrict__ d, const T* __restrict__ e,
                                    const T* __restrict__ z, T* out, int64_t n, double c_x, double c_d,
                                    double c_e, double c_z, int32_t step, int32_t* flag) {
  using M = math_t<T>;
  const M cx = static_cast<M>(c_x), cd = static_cast<M>(c_d), ce = static_cast<M>(c_e), cz = static_cast<M>(c_z);
  bool bad = false;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const M dv = to_math(d[i]);
    M acc = cd * dv;                       // same association as the CPU kernel
    if (HasE) acc = fma(ce, to_math(e[i]), acc);
    if (HasZ) acc = fma(cz, to_math(z[i]), acc);
    acc = fma(cx, to_math(x[i]), acc);
    const T stored = from_math<T>(acc);
    out[i] = stored;
    if (HasFlag) bad |= !isfinite(dv) || !isfinite(to_math(stored));
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

void sampler_step_cuda_launch(DType dtype, std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z,
                              std::uintptr_t out, int64_t n, double c_x, double c_d, double c_e, double c_z,
                              int32_t step, std::uintptr_t flag, int device, std::uintptr_t stream) {
  CudaDeviceGuard guard(device);
  auto* xp = reinterpret_cast<const void*>(x);
  auto* dp = reinterpret_cast<const void*>(d);
  auto* ep = reinterpret_cast<const void*>(e);
  auto* zp = reinterpret_cast<const void*>(z);
  auto* op = reinterpret_cast<void*>(out);
  auto* fp = reinterpret_cast<int32_t*>(flag);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_dtype<float, double, __half, __nv_bfloat16>(dtype, "dtype", [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_typed<T>(xp, dp, ep, zp, op, n, c_x, c_d, c_e, c_z, step, fp, s);
  });
  check_cuda_launch("sampler_step");
}

}  // namespace diffcore
