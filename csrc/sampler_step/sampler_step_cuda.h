// Host launcher of the fused sampler step on CUDA (csrc/sampler_step/sampler_step.cu).
#pragma once
#include <cstdint>

#include "common/checks.h"

namespace diffcore {

// out[i] = c_x x[i] + c_d d[i] + c_e e[i] + c_z z[i] for i < n (fp32 math for fp32/fp16/bf16,
// fp64 for fp64). e and z may be 0 (absent). When flag != 0 it points to one int32 on the device
// that is lowered to `step` (atomicMin) if any d[i] or out[i] is NaN or Inf: a deferred check,
// no host synchronization. dtype: float32, float64, float16 or bfloat16. Runs on `device` (made
// current for the launch) on `stream` (a cudaStream_t).
void sampler_step_cuda_launch(DType dtype, std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z,
                              std::uintptr_t out, int64_t n, double c_x, double c_d, double c_e, double c_z,
                              int32_t step, std::uintptr_t flag, int device, std::uintptr_t stream);

}  // namespace diffcore
