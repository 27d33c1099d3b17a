// The one dtype helper of every .cu file: DType (common/checks.h) -> C++ element type, chosen once
// per launch on the host (`dispatch_dtype`), and per-element conversions overloaded on that type,
// so that no kernel switches on a dtype inside its loops.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/checks.h"

namespace diffcore {

// ---------------------------------------------------------------- element -> float / double
// uint8 pixels are images mapped to [-1, 1] as u / 127.5 - 1 (as common/distance.h on the CPU);
// to_float rounds as fl32(u * fl32(1/127.5)) - 1, to_double as u / 127.5 - 1 in double.
__host__ __device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__host__ __device__ __forceinline__ float to_float(uint8_t v) {
  return static_cast<float>(v) * (1.0f / 127.5f) - 1.0f;
}

__host__ __device__ __forceinline__ double to_double(float v) { return static_cast<double>(v); }
__host__ __device__ __forceinline__ double to_double(double v) { return v; }
__device__ __forceinline__ double to_double(__half v) { return static_cast<double>(__half2float(v)); }
__device__ __forceinline__ double to_double(__nv_bfloat16 v) { return static_cast<double>(__bfloat162float(v)); }
__host__ __device__ __forceinline__ double to_double(uint8_t v) { return static_cast<double>(v) / 127.5 - 1.0; }

// ---------------------------------------------------------------- arithmetic type of an element
// float for float32/float16/bfloat16 (16-bit types are computed in fp32), double for float64.
template <typename T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <typename T> using math_t = typename MathOf<T>::type;

__host__ __device__ __forceinline__ float to_math(float v) { return v; }
__host__ __device__ __forceinline__ double to_math(double v) { return v; }
__device__ __forceinline__ float to_math(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_math(__nv_bfloat16 v) { return __bfloat162float(v); }

// math_t<T> -> element, round to nearest even.
template <typename T> __device__ __forceinline__ T from_math(math_t<T> v);
template <> __device__ __forceinline__ float from_math<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_math<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_math<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_math<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------- host dispatch
template <typename T> struct TypeTag { using type = T; };

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::float32; }
template <> constexpr DType dtype_of<__half>() { return DType::float16; }
template <> constexpr DType dtype_of<__nv_bfloat16>() { return DType::bfloat16; }
template <> constexpr DType dtype_of<double>() { return DType::float64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::uint8; }

// Calls f(TypeTag<T>{}) for the T among Ts whose DType is `dtype`; otherwise raises ValueError
// naming `arg`. Instantiates f for the listed types only.
template <typename... Ts, typename F>
void dispatch_dtype(DType dtype, const char* arg, F&& f) {
  const bool found = ((dtype == dtype_of<Ts>() ? (f(TypeTag<Ts>{}), true) : false) || ...);
  if (!found) fail_arg(arg, "dtype not supported by this CUDA kernel");
}

}  // namespace diffcore
