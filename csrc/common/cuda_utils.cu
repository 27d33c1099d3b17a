#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_utils.h"

namespace diffcore {

bool cuda_device_available() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return false;
  }
  return count > 0;
}

void check_cuda_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("diffcore CUDA kernel '") + what + "' failed: " + cudaGetErrorString(err));
  }
}

std::string cuda_build_version() { return std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10); }

}  // namespace diffcore
