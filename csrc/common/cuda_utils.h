// Helpers for the CUDA sources (.cu) and the host code that calls them. Plain C++ (no CUDA
// headers): the op's .cpp files include it in every build.
#pragma once
#include <string>

namespace diffcore {

// Whether a CUDA device is usable; false on builds without CUDA or machines without a GPU.
bool cuda_device_available();

// Raises std::runtime_error naming `what` if the last CUDA call or launch failed (CUDA builds).
void check_cuda_launch(const char* what);

// Version of the CUDA toolkit the module was built with, or "" without CUDA.
std::string cuda_build_version();

// Number of streaming multiprocessors of `device` (CUDA builds; raises without CUDA).
int cuda_multiprocessor_count(int device);

// The one way every op selects its device: makes `device` current for the scope of a launch and
// restores the previous current device afterwards (CUDA builds only).
class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device);
  ~CudaDeviceGuard();
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace diffcore
