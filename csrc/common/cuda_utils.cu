#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common/cuda_utils.h"

namespace diffcore {
namespace {

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error("diffcore CUDA: " + what + ": " + cudaGetErrorString(err));
}

}  // namespace

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

int cuda_multiprocessor_count(int device) {
  int count = 0;
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "multiprocessor count of device " + std::to_string(device));
  return count;
}

CudaDeviceGuard::CudaDeviceGuard(int device) {
  check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
  if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
}

CudaDeviceGuard::~CudaDeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

}  // namespace diffcore
