// Bindings of the attention kernels. Python (diffcore.ops._attention_cuda) validates and allocates;
// this file checks the arguments again and launches the CUDA kernels (attention.cu). There is no
// CPU C++ kernel: the chunked batched-torch formula (diffcore.ops._attention_cpu) is the cpu path.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "attention/attention_cuda.h"
#include "common/checks.h"
#include "common/registry.h"

namespace py = pybind11;

namespace {

void attention_forward(const std::string& dtype_name, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v,
                       std::uintptr_t tq, std::uintptr_t tk, std::uintptr_t tv, std::uintptr_t o,
                       std::uintptr_t to, std::uintptr_t lse, int64_t bh, int64_t lq, int64_t lk, int64_t d,
                       double scale, bool jvp, int device, std::uintptr_t stream) {
  using namespace diffcore;
  const DType dtype = parse_dtype(dtype_name, "dtype");
  check_arg(dtype == DType::float32 || dtype == DType::float16 || dtype == DType::bfloat16, "dtype",
            "expected float32, float16 or bfloat16, got " + dtype_name);
  check_ptr(q, "q");
  check_ptr(k, "k");
  check_ptr(v, "v");
  check_ptr(o, "o");
  check_ptr(lse, "lse");
  if (jvp) check_ptr(to, "to");
  check_positive(bh, "bh");
  check_positive(lq, "lq");
  check_positive(lk, "lk");
  check_positive(d, "d");
  check_arg(d <= 256, "d", "expected a head dim of at most 256, got " + std::to_string(d));
  check_arg(lq < (int64_t(1) << 31) && lk < (int64_t(1) << 31) && bh < 65536, "bh",
            "expected bh < 65536 and sequence lengths < 2^31");
#ifdef DIFFCORE_WITH_CUDA
  attention_forward_cuda(dtype, q, k, v, tq, tk, tv, o, to, lse, bh, lq, lk, d, float(scale), jvp, device, stream);
#else
  (void)tq, (void)tk, (void)tv, (void)scale, (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: attention_forward: built without CUDA (DIFFCORE_CUDA=OFF or no nvcc)");
#endif
}

void register_attention(py::module_& m) {
  using namespace diffcore;
  def_keyword_only(m, "attention_forward", &attention_forward,
                   keywords("dtype", "q", "k", "v", "tq", "tk", "tv", "o", "to", "lse", "bh", "lq", "lk", "d", "scale",
                            "jvp", "device", "stream"),
                   "CUDA attention forward (jvp=False) or fused forward + JVP (jvp=True) on contiguous "
                   "[bh, L, d] device buffers given as data pointers; tq/tk/tv may be 0. Writes o, to, lse.");
}

}  // namespace

DIFFCORE_REGISTER(attention, register_attention);
