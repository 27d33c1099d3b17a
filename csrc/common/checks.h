// Argument checks at the extension boundary. Python validates first; C++ checks again, because
// _C is callable directly. Every message names the argument and what was expected.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace diffcore {

// Raised as ValueError in Python (pybind11 maps std::invalid_argument to ValueError).
[[noreturn]] inline void fail_arg(const std::string& arg, const std::string& expected) {
  throw std::invalid_argument("diffcore._C: argument '" + arg + "': " + expected);
}

inline void check_arg(bool ok, const std::string& arg, const std::string& expected) {
  if (!ok) fail_arg(arg, expected);
}

inline void check_ptr(std::uintptr_t ptr, const std::string& arg) {
  check_arg(ptr != 0, arg, "expected a non-null data pointer");
}

inline void check_positive(int64_t value, const std::string& arg) {
  if (value <= 0) {
    std::ostringstream msg;
    msg << "expected a positive size, got " << value;
    fail_arg(arg, msg.str());
  }
}

// Element types crossing the boundary, named as torch names them without the "torch." prefix.
enum class DType { float32, float16, bfloat16, float64, uint8, int8, int32 };

inline DType parse_dtype(const std::string& name, const std::string& arg) {
  if (name == "float32") return DType::float32;
  if (name == "float16") return DType::float16;
  if (name == "bfloat16") return DType::bfloat16;
  if (name == "float64") return DType::float64;
  if (name == "uint8") return DType::uint8;
  if (name == "int8") return DType::int8;    // screening copies only (knn's int8 screen)
  if (name == "int32") return DType::int32;  // integer Gram tiles only
  fail_arg(arg, "unsupported dtype '" + name + "' (expected float32, float16, bfloat16, float64, uint8, int8 or int32)");
}

// Number of threads for CPU kernels; 0 means "the OpenMP default". Python passes
// torch.get_num_threads() so that diffcore and torch agree.
inline int resolve_threads(int requested);

}  // namespace diffcore

#ifdef DIFFCORE_WITH_OPENMP
#include <omp.h>
inline int diffcore::resolve_threads(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }
#else
inline int diffcore::resolve_threads(int) { return 1; }
#endif
