// The only PYBIND11_MODULE of diffcore. Ops register themselves (csrc/common/registry.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "common/cuda_utils.h"
#include "common/registry.h"

namespace py = pybind11;

#ifndef DIFFCORE_WITH_CUDA
namespace diffcore {
bool cuda_device_available() { return false; }
std::string cuda_build_version() { return ""; }
int cuda_multiprocessor_count(int) {
  throw std::runtime_error("diffcore._C: cuda_multiprocessor_count: built without CUDA (DIFFCORE_CUDA=OFF or no nvcc)");
}
}  // namespace diffcore
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "diffcore compiled kernels (CPU C++ and, where built, CUDA). Call through diffcore.ops.";

  m.def("cuda_available", &diffcore::cuda_device_available,
        "True when the module was built with CUDA kernels and a CUDA device is usable.");

  m.def("cuda_multiprocessor_count", &diffcore::cuda_multiprocessor_count, py::kw_only(), py::arg("device"),
        "Number of streaming multiprocessors of CUDA device `device` (the GPU is asked, not assumed).");

  m.def("build_info", []() {
    py::dict info;
    info["cuda_mode"] = std::string(DIFFCORE_CUDA_MODE);  // DIFFCORE_CUDA at build time
#ifdef DIFFCORE_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = diffcore::cuda_build_version();
    info["cuda_archs"] = std::string(DIFFCORE_CUDA_ARCHS);
#else
    info["cuda"] = false;
    info["cuda_version"] = py::none();
    info["cuda_archs"] = py::none();
#endif
#ifdef DIFFCORE_WITH_OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#else
    info["compiler"] = "unknown";
#endif
#ifdef __AVX2__
    info["avx2"] = true;
#else
    info["avx2"] = false;
#endif
    py::list ops;
    for (auto& entry : diffcore::registry()) ops.append(entry.first);
    info["ops"] = ops;
    return info;
  }, "What was built: CUDA (requested mode, version, architectures), OpenMP, compiler, AVX2, registered ops.");

  for (auto& entry : diffcore::registry()) entry.second(m);
}
