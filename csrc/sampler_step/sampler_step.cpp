// Fused sampler step on the CPU: out = c_x x + c_d d + c_e e + c_z z in one pass, with an
// non-finite check of d and out folded into the same pass (no second read).
//
// Bitwise determinism: every element is computed by the same expression, written with explicit
// std::fma in a fixed order, so the vectorized body, the tail and any OpenMP split give identical
// bits (the compiler may not re-associate or contract differently per position); the result of
// element i therefore does not depend on the tensor's size, the thread count or the run.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "common/checks.h"
#include "common/registry.h"
#ifdef DIFFCORE_WITH_CUDA
#include "sampler_step/sampler_step_cuda.h"
#endif

namespace py = pybind11;

namespace diffcore {
namespace {

// Split like torch's own elementwise ops: one thread below at::internal::GRAIN_SIZE (32768
// elements), else one contiguous block per thread, in thread order (at::parallel_for over [0, n)
// with as many tasks as threads). A sampler loop alternates this step with the denoiser's torch
// ops on the same tensors, so each core then finds in its cache the part of the denoiser output it
// wrote and keeps the part of the state it reads next, and the OpenMP team (torch's libgomp, shared
// with this extension) stays the one torch uses. Measured (a 50-step Euler loop, 2 threads,
// 16x3x32x32 = 49152 elements): one thread here made the whole trajectory several times slower
// under load than this split (bench/baselines/MEASUREMENTS.md, 2026-12-06).
constexpr int64_t kMinParallel = 32768;
// Block boundaries are rounded to 16 elements (a 64-byte line of float32; four of float64), so no
// two threads write one cache line of float32 output.
constexpr int64_t kAlign = 16;

#ifdef DIFFCORE_WITH_OPENMP
inline int64_t thread_index() { return omp_get_thread_num(); }
#else
inline int64_t thread_index() { return 0; }  // resolve_threads gives 1 here: the parallel path never runs
#endif

template <typename T, bool HasE, bool HasZ>
int64_t step_range(const T* x, const T* __restrict d, const T* __restrict e, const T* __restrict z,
                   T* out, int64_t begin, int64_t end, T cx, T cd, T ce, T cz) {
  // v - v is 0 for finite v and NaN for NaN/Inf, and a sum of zeros stays exactly 0 in any order
  // while a NaN sticks: a branch-free finiteness test that vectorizes without leaving the float
  // domain (an integer count per element costs conversions and halves the throughput).
  T check = T(0);
#pragma omp simd reduction(+ : check)
  for (int64_t i = begin; i < end; ++i) {
    const T dv = d[i];
    T acc = cd * dv;
    if (HasE) acc = std::fma(ce, e[i], acc);
    if (HasZ) acc = std::fma(cz, z[i], acc);
    acc = std::fma(cx, x[i], acc);
    out[i] = acc;
    check += (dv - dv) + (acc - acc);
  }
  return check == T(0) ? 0 : 1;
}

template <typename T, bool HasE, bool HasZ>
int64_t step_all(const T* x, const T* d, const T* e, const T* z, T* out, int64_t n, double c_x, double c_d,
                 double c_e, double c_z, int threads) {
  const T cx = static_cast<T>(c_x), cd = static_cast<T>(c_d), ce = static_cast<T>(c_e), cz = static_cast<T>(c_z);
  if (threads <= 1 || n < kMinParallel) return step_range<T, HasE, HasZ>(x, d, e, z, out, 0, n, cx, cd, ce, cz);
  // As at::parallel_for: min(threads, ceil(n / kMinParallel)) contiguous blocks, block t on thread t.
  const int64_t tasks = std::min<int64_t>(threads, (n + kMinParallel - 1) / kMinParallel);
  const int64_t per = ((n + tasks - 1) / tasks + kAlign - 1) / kAlign * kAlign;
  int64_t bad = 0;
#pragma omp parallel num_threads(static_cast<int>(tasks)) reduction(+ : bad)
  {
    const int64_t begin = std::min(n, thread_index() * per);
    const int64_t end = std::min(n, begin + per);
    if (begin < end) bad += step_range<T, HasE, HasZ>(x, d, e, z, out, begin, end, cx, cd, ce, cz);
  }
  return bad;
}

template <typename T>
int64_t step_typed(std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z, std::uintptr_t out,
                   int64_t n, double cx, double cd, double ce, double cz, int threads) {
  auto* xp = reinterpret_cast<const T*>(x);
  auto* dp = reinterpret_cast<const T*>(d);
  auto* ep = reinterpret_cast<const T*>(e);
  auto* zp = reinterpret_cast<const T*>(z);
  auto* op = reinterpret_cast<T*>(out);
  if (e && z) return step_all<T, true, true>(xp, dp, ep, zp, op, n, cx, cd, ce, cz, threads);
  if (e) return step_all<T, true, false>(xp, dp, ep, zp, op, n, cx, cd, ce, cz, threads);
  if (z) return step_all<T, false, true>(xp, dp, ep, zp, op, n, cx, cd, ce, cz, threads);
  return step_all<T, false, false>(xp, dp, ep, zp, op, n, cx, cd, ce, cz, threads);
}

// Checks shared by the CPU and CUDA entry points (pointers, size, optional operands).
void check_step_args(std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z,
                     std::uintptr_t out, int64_t n, double c_e, double c_z) {
  check_ptr(x, "x");
  check_ptr(d, "denoised");
  check_ptr(out, "out");
  check_positive(n, "numel");
  check_arg(c_e == 0.0 || e != 0, "extra", "required when its coefficient is non-zero");
  check_arg(c_z == 0.0 || z != 0, "noise", "required when its coefficient is non-zero");
}

// CPU entry: returns the number of OpenMP chunks in which d or out held NaN/Inf (0 when all finite).
// When flag != 0 (a CPU int32), a non-zero count also lowers *flag to `step`.
int64_t sampler_step_cpu(const std::string& dtype, std::uintptr_t x, std::uintptr_t d, std::uintptr_t e,
                         std::uintptr_t z, std::uintptr_t out, int64_t n, double c_x, double c_d, double c_e,
                         double c_z, int32_t step, std::uintptr_t flag, int threads) {
  check_step_args(x, d, e, z, out, n, c_e, c_z);
  const DType type = parse_dtype(dtype, "dtype");
  const int nthreads = resolve_threads(threads);
  int64_t bad = 0;
  switch (type) {
    case DType::float32: bad = step_typed<float>(x, d, e, z, out, n, c_x, c_d, c_e, c_z, nthreads); break;
    case DType::float64: bad = step_typed<double>(x, d, e, z, out, n, c_x, c_d, c_e, c_z, nthreads); break;
    default: fail_arg("dtype", "the CPU sampler step supports float32 and float64, got '" + dtype + "'");
  }
  if (bad > 0 && flag != 0) {
    auto* f = reinterpret_cast<int32_t*>(flag);
    *f = std::min(*f, step);
  }
  return bad;
}

// A CPU step bound once per trajectory to its dtype, size, flag and thread count, called with
// positional arguments: a sampler takes 10-1000 steps on tensors of one shape, and pybind11's
// keyword-argument dispatch of `sampler_step_cpu` (14 names looked up per call) cost more than a
// third of the fused step's own time at 16x3x32x32. The factory keeps every argument by
// name; the callable it returns is internal to diffcore's sampler loops
// (python/diffcore/ops/_sampler_step_cpu.py), which pass (x, denoised, extra, noise, out, c_x,
// c_denoised, c_extra, c_noise, step) in this order from one place.
py::cpp_function sampler_step_cpu_bind(const std::string& dtype, int64_t n, std::uintptr_t flag, int threads) {
  check_positive(n, "numel");
  const DType type = parse_dtype(dtype, "dtype");
  check_arg(type == DType::float32 || type == DType::float64, "dtype",
            "the CPU sampler step supports float32 and float64, got '" + dtype + "'");
  const int nthreads = resolve_threads(threads);
  auto step = [type, n, flag, nthreads](std::uintptr_t x, std::uintptr_t d, std::uintptr_t e, std::uintptr_t z,
                                        std::uintptr_t out, double c_x, double c_d, double c_e, double c_z,
                                        int32_t index) -> int64_t {
    check_step_args(x, d, e, z, out, n, c_e, c_z);
    const int64_t bad = type == DType::float32
                            ? step_typed<float>(x, d, e, z, out, n, c_x, c_d, c_e, c_z, nthreads)
                            : step_typed<double>(x, d, e, z, out, n, c_x, c_d, c_e, c_z, nthreads);
    if (bad > 0 && flag != 0) {
      auto* f = reinterpret_cast<int32_t*>(flag);
      *f = std::min(*f, index);
    }
    return bad;
  };
  return py::cpp_function(std::move(step), py::call_guard<py::gil_scoped_release>(), py::arg("x"),
                          py::arg("denoised"), py::arg("extra"), py::arg("noise"), py::arg("out"), py::arg("c_x"),
                          py::arg("c_denoised"), py::arg("c_extra"), py::arg("c_noise"), py::arg("step"));
}

int64_t sampler_step_cuda(const std::string& dtype, std::uintptr_t x, std::uintptr_t d, std::uintptr_t e,
                          std::uintptr_t z, std::uintptr_t out, int64_t n, double c_x, double c_d, double c_e,
                          double c_z, int32_t step, std::uintptr_t flag, int device, std::uintptr_t stream) {
  check_step_args(x, d, e, z, out, n, c_e, c_z);
  const DType type = parse_dtype(dtype, "dtype");
  check_arg(type == DType::float32 || type == DType::float64 || type == DType::float16 || type == DType::bfloat16,
            "dtype", "the CUDA sampler step supports float32, float64, float16 and bfloat16, got '" + dtype + "'");
#ifdef DIFFCORE_WITH_CUDA
  sampler_step_cuda_launch(type, x, d, e, z, out, n, c_x, c_d, c_e, c_z, step, flag, device, stream);
  return 0;
#else
  (void)c_x, (void)c_d, (void)step, (void)flag, (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: sampler_step_cuda: built without CUDA (DIFFCORE_CUDA=OFF or no nvcc)");
#endif
}

void register_sampler_step(py::module_& m) {
  // The buffers, size and coefficients of one step (the CPU and CUDA steps take the same run).
  const auto step_keywords = keywords("dtype", "x", "denoised", "extra", "noise", "out", "numel", "c_x", "c_denoised",
                                      "c_extra", "c_noise", "step", "flag");
  def_keyword_only(m, "sampler_step_cpu", &sampler_step_cpu, std::tuple_cat(step_keywords, keywords("threads")),
                   "Fused sampler step on contiguous CPU buffers: out = c_x x + c_denoised denoised + c_extra extra + "
                   "c_noise noise (extra/noise may be 0 = absent). Returns > 0 when denoised or out holds NaN/Inf; "
                   "if non-zero and flag != 0, lowers the int32 at flag to step.");
  // makes a Python function object, which needs the GIL: no call_guard, so not def_keyword_only
  m.def("sampler_step_cpu_bind", &sampler_step_cpu_bind, py::kw_only(), py::arg("dtype"), py::arg("numel"),
        py::arg("flag"), py::arg("threads"),
        "The CPU step of sampler_step_cpu bound to a dtype, a size, a flag (0 = none) and a thread count: "
        "returns step(x, denoised, extra, noise, out, c_x, c_denoised, c_extra, c_noise, step) -> int, "
        "called positionally (a sampler loop's hot path), same result and return value.");
  def_keyword_only(m, "sampler_step_cuda", &sampler_step_cuda,
                   std::tuple_cat(step_keywords, keywords("device", "stream")),
                   "Fused sampler step on contiguous CUDA buffers (same formula); the NaN/Inf check is deferred: "
                   "when flag != 0 the device int32 at flag is lowered to step (atomicMin). Returns 0.");
}

}  // namespace

DIFFCORE_REGISTER(sampler_step, register_sampler_step);

}  // namespace diffcore
