// Host launch functions of the CUDA attention kernels (attention.cu). Plain C++: no CUDA headers,
// so attention.cpp includes it in every build and calls it only under DIFFCORE_WITH_CUDA.
#pragma once
#include <cstdint>

#include "common/checks.h"

namespace diffcore {

// Forward (jvp=false) or fused forward + JVP (jvp=true) of softmax(q k^T * scale) v.
// q, tq, o, to: [bh, lq, d]; k, v, tk, tv: [bh, lk, d]; contiguous, element type `dtype`
// (float32, float16, bfloat16); lse: [bh, lq] float32. tq/tk/tv may be 0 (zero tangent);
// to is ignored without jvp. Runs on `device` (made current for the launch); `stream` is a
// cudaStream_t as an integer (0: default stream).
void attention_forward_cuda(DType dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                            std::uintptr_t tq, std::uintptr_t tk, std::uintptr_t tv,
                            std::uintptr_t o, std::uintptr_t to, std::uintptr_t lse,
                            int64_t bh, int64_t lq, int64_t lk, int64_t d, float scale, bool jvp,
                            int device, std::uintptr_t stream);

}  // namespace diffcore
