// Helpers for the CUDA sources (.cu) and the host code that calls them.
#pragma once
#include <string>

namespace diffcore {

// Whether a CUDA device is usable; false on builds without CUDA or machines without a GPU.
bool cuda_device_available();

// Raises std::runtime_error naming `what` if the last CUDA call or launch failed (CUDA builds).
void check_cuda_launch(const char* what);

// Version of the CUDA toolkit the module was built with, or "" without CUDA.
std::string cuda_build_version();

}  // namespace diffcore
