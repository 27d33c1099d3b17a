// Empirical optimal denoiser, CPU part: the fused work between torch's tile GEMMs.
//
// The Python side (diffcore/ops/_empirical_denoise_cpu.py) streams over training-set tiles of T rows:
//   G = x @ tile^T                      (torch's BLAS, fp32)
//   ed_tile_update(G, ...)              (here) G -> weights P, running max / sum updated
//   acc = acc * scale + P @ tile        (torch addmm when many weights are nonzero) or
//   ed_sparse_accumulate(P, ...)        (here, when few are: small sigma)
// so that [B, N] is never materialized. Logits are l = -|x - y|^2 / (2 sigma^2) computed as
// -(|x|^2 + |y|^2 - 2 G) / (2 sigma^2) with exact (double) norms; the GEMM error of G (about
// k u |x| |y|, docs/design.md, Numerics) becomes a per-pair logit error bound e. Pairs that may carry
// weight and whose e exceeds `rescore_tol` are re-scored with exact distances (difference first,
// double accumulation).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/distance.h"
#include "common/registry.h"
#ifdef DIFFCORE_WITH_CUDA
#include "empirical_denoise/empirical_denoise_cuda.h"
#endif

namespace py = pybind11;

namespace diffcore {
namespace {

// Below this many elementary operations a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 17;

// uint8 pixels as double (u / 127.5 - 1, as in distance.h), tabulated for the decoding loops.
struct PixelTable {
  double value[256];
  PixelTable() {
    for (int u = 0; u < 256; ++u) value[u] = value_as_double(static_cast<uint8_t>(u));
  }
};
const PixelTable& pixel_table() {
  static const PixelTable table;
  return table;
}

// Exact squared distance between a float row x and a float or uint8 training row (distance.h).
double exact_sqdist_row(const float* x, const void* y, DType y_dtype, int64_t dim) {
  if (y_dtype == DType::float32) return exact_sqdist(x, static_cast<const float*>(y), dim);
  return exact_sqdist(x, static_cast<const uint8_t*>(y), dim);
}

double row_sqnorm(const void* row, DType dtype, int64_t dim) {
  double total = 0;
  if (dtype == DType::float32) {
    const auto* r = static_cast<const float*>(row);
#pragma omp simd reduction(+ : total)
    for (int64_t i = 0; i < dim; ++i) total += static_cast<double>(r[i]) * static_cast<double>(r[i]);
  } else {
    const auto* r = static_cast<const uint8_t*>(row);
    const double* table = pixel_table().value;
    for (int64_t i = 0; i < dim; ++i) total += table[r[i]] * table[r[i]];
  }
  return total;
}

DType train_dtype(const std::string& name) {
  const DType dtype = parse_dtype(name, "train_dtype");
  check_arg(dtype == DType::float32 || dtype == DType::uint8, "train_dtype",
            "the CPU kernel takes float32 or uint8 training rows, got " + name);
  return dtype;
}

int64_t element_size(DType dtype) { return dtype == DType::uint8 ? 1 : 4; }

// |y_i|^2 in double for rows [0, rows) of a training set with row stride `ld` (elements).
void row_sqnorms(std::uintptr_t y_ptr, const std::string& dtype_name, int64_t rows, int64_t dim, int64_t ld,
                 std::uintptr_t out_ptr, int threads) {
  check_ptr(y_ptr, "train");
  check_ptr(out_ptr, "out");
  check_positive(rows, "rows");
  check_positive(dim, "dim");
  check_arg(ld >= dim, "ld", "row stride must be >= dim");
  const DType dtype = train_dtype(dtype_name);
  const auto* base = reinterpret_cast<const char*>(y_ptr);
  auto* out = reinterpret_cast<double*>(out_ptr);
  const int64_t row_bytes = ld * element_size(dtype);
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * dim > kMinParallelWork)
  for (int64_t i = 0; i < rows; ++i) out[i] = row_sqnorm(base + i * row_bytes, dtype, dim);
}

// float -> bfloat16 bits, round to nearest even (finite inputs).
inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Training rows [rows, dim] (float32 or uint8 as u/127.5-1) into a float32 or bfloat16 buffer, each
// value rounded once from its exact value (the GEMM error bounds assume one relative rounding).
void decode_rows(std::uintptr_t src_ptr, const std::string& src_dtype, int64_t rows, int64_t dim,
                 std::uintptr_t dst_ptr, const std::string& dst_dtype, int threads) {
  check_ptr(src_ptr, "src");
  check_ptr(dst_ptr, "dst");
  check_positive(rows, "rows");
  check_positive(dim, "dim");
  const DType sd = train_dtype(src_dtype);
  const DType dd = parse_dtype(dst_dtype, "dst_dtype");
  check_arg(dd == DType::float32 || dd == DType::bfloat16, "dst_dtype", "expected float32 or bfloat16, got " + dst_dtype);
  const int64_t total = rows * dim;
  float table[256];
  for (int u = 0; u < 256; ++u) table[u] = static_cast<float>(pixel_table().value[u]);
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (total > kMinParallelWork)
  for (int64_t i = 0; i < total; ++i) {
    const float v = sd == DType::uint8 ? table[reinterpret_cast<const uint8_t*>(src_ptr)[i]]
                                       : reinterpret_cast<const float*>(src_ptr)[i];
    if (dd == DType::float32)
      reinterpret_cast<float*>(dst_ptr)[i] = v;
    else
      reinterpret_cast<uint16_t*>(dst_ptr)[i] = to_bf16_bits(v);
  }
}

// Gram entries as double: float32, float64, or bfloat16 (raw bits, from a bf16 screening GEMM).
inline double gram_value(float v) { return v; }
inline double gram_value(double v) { return v; }
inline double gram_value(uint16_t bf16_bits) {
  const uint32_t bits = static_cast<uint32_t>(bf16_bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Everything one tile needs, as typed pointers.
struct TileArgs {
  int64_t batch, tile, dim, x_ld, y_row_bytes, g_ld;
  const float* x;
  const double* xn2;
  const double* inv2s2;
  const char* y;
  DType y_dtype;
  const double* yn2;
  double gemm_err_coef, rounding_coef, rescore_tol, band;
  double* m;
  double* mlow;
  double* s;
  float* scale;
  float* p;  // [B, T] weights out (row stride g_ld)
};

// Float64 rounding of the logit -(|x|^2 + |y|^2 - 2 G) c (all three terms and the exact distance
// of a re-scored pair are at most (|x| + |y|)^2; rounding_coef = gamma_{D+4} in float64). The part
// common to a query's pairs (the error of |x|^2) cancels in the softmax and is not counted.
inline double rounding_bound(double rounding_coef, double xnorm, double ynorm, double c) {
  const double r = xnorm + ynorm;
  return rounding_coef * r * r * c;
}

// One query row of a tile. With commit=false only counts the pairs that would be re-scored
// (nothing is written); with commit=true writes P and updates the running state.
template <typename G>
int64_t process_row(const TileArgs& a, const G* grow, int64_t b, bool commit, std::vector<double>& logit,
                    std::vector<double>& err, const std::vector<double>& ynorm, double ynorm_max,
                    int64_t* nonzero) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  const double c = a.inv2s2[b];
  const double xn = a.xn2[b];
  const float* xrow = a.x + b * a.x_ld;
  // logit error bound: 2 |dG| / (2 sigma^2) with |dG| <= k u |x| |y|, plus the float64 rounding of
  // |x|^2 + |y|^2 - 2 G (rounding_bound; it matters only for huge |x| or |y|).
  const double xnorm = std::sqrt(xn);
  const double err_per_ynorm = 2.0 * a.gemm_err_coef * xnorm * c;
  if (!commit && rounding_bound(a.rounding_coef, xnorm, ynorm_max, c) + err_per_ynorm * ynorm_max <= a.rescore_tol)
    return 0;  // nothing to re-score
  double lower = a.mlow[b];
  for (int64_t j = 0; j < a.tile; ++j) {
    const double l = -(xn + a.yn2[j] - 2.0 * gram_value(grow[j])) * c;
    const double e = err_per_ynorm * ynorm[j] + rounding_bound(a.rounding_coef, xnorm, ynorm[j], c);
    logit[j] = l;
    err[j] = e;
    lower = std::max(lower, l - e);
  }
  // Pairs whose upper bound is below (lower - band) weigh less than exp(-band) of the largest
  // weight: dropped. The rest keep their logit when its error is small enough, else are re-scored.
  const double cut = lower - a.band;
  int64_t rescored = 0;
  if (!commit) {
    for (int64_t j = 0; j < a.tile; ++j) rescored += (logit[j] + err[j] >= cut) && (err[j] > a.rescore_tol);
    return rescored;
  }
  double mx = a.m[b];
  for (int64_t j = 0; j < a.tile; ++j) {
    if (logit[j] + err[j] < cut) {
      logit[j] = neg_inf;
      continue;
    }
    if (err[j] > a.rescore_tol) {
      const double d = exact_sqdist_row(xrow, a.y + j * a.y_row_bytes, a.y_dtype, a.dim);
      logit[j] = -d * c;
      lower = std::max(lower, logit[j]);
      ++rescored;
    }
    mx = std::max(mx, logit[j]);
  }
  const double alpha = (a.m[b] == neg_inf) ? 0.0 : std::exp(a.m[b] - mx);
  float* prow = a.p + b * a.g_ld;
  double sum = 0;
  int64_t count = 0;
  for (int64_t j = 0; j < a.tile; ++j) {
    if (logit[j] == neg_inf) {
      prow[j] = 0.0f;
      continue;
    }
    const float p = static_cast<float>(std::exp(logit[j] - mx));
    prow[j] = p;
    sum += static_cast<double>(p);
    count += p != 0.0f;
  }
  a.s[b] = a.s[b] * alpha + sum;
  a.m[b] = mx;
  a.mlow[b] = lower;
  a.scale[b] = static_cast<float>(alpha);
  *nonzero += count;
  return rescored;
}

template <typename G>
std::pair<int64_t, int64_t> run_tile(const TileArgs& a, const G* g, int64_t rescore_budget, bool count_only,
                                     int threads) {
  std::vector<double> ynorm(a.tile);
  double ynorm_max = 0;
  for (int64_t j = 0; j < a.tile; ++j) ynorm[j] = std::sqrt(a.yn2[j]), ynorm_max = std::max(ynorm_max, ynorm[j]);
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
  if (rescore_budget >= 0) {  // dry run: would this tile re-score more pairs than the budget?
    int64_t wanted = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : wanted) if (a.batch * a.tile > kMinParallelWork / 8)
    {
      std::vector<double> logit(a.tile), err(a.tile);
      int64_t unused = 0;
#pragma omp for schedule(static)
      for (int64_t b = 0; b < a.batch; ++b) wanted += process_row(a, g + b * a.g_ld, b, false, logit, err, ynorm, ynorm_max, &unused);
    }
    if (count_only || wanted > rescore_budget) return {-1, wanted};
  }
  int64_t nonzero = 0, rescored = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : nonzero, rescored) if (a.batch * a.tile > kMinParallelWork / 8)
  {
    std::vector<double> logit(a.tile), err(a.tile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < a.batch; ++b) rescored += process_row(a, g + b * a.g_ld, b, true, logit, err, ynorm, ynorm_max, &nonzero);
  }
  return {nonzero, rescored};
}

// rescore_budget value asking only for the number of pairs that would be re-scored: (-1, wanted).
constexpr int64_t kCountOnly = -3;

// One training tile: turn G [B, T] (x . y; float32, bfloat16 from a screening GEMM, or float64) into weights
// P = exp(l - m_new) in p (float32 [B, T], may alias g when g is float32; 0 for pairs that cannot
// carry weight), update the running max m, the running lower bound m_low of the max (max over pairs
// of l - e), the running sum s, and write scale = exp(m_old - m_new).
// With rescore_budget >= 0 and more pairs to re-score than that, nothing is written and
// (-1, wanted) is returned (the caller then recomputes G more precisely). With rescore_budget == -3
// nothing is written and (-1, number of pairs that would be re-scored) is returned; -1 means no
// budget. Otherwise returns (number of nonzero weights, number of re-scored pairs).
std::pair<int64_t, int64_t> tile_update(
    std::uintptr_t g_ptr, const std::string& g_dtype, int64_t g_ld, std::uintptr_t p_ptr, int64_t batch,
    int64_t tile, std::uintptr_t x_ptr, int64_t x_ld, int64_t dim, std::uintptr_t xn2_ptr,
    std::uintptr_t inv2s2_ptr, std::uintptr_t y_ptr, const std::string& y_dtype_name, int64_t y_ld,
    std::uintptr_t yn2_ptr, double gemm_err_coef, double rounding_coef, double rescore_tol, double band,
    int64_t rescore_budget, std::uintptr_t m_ptr, std::uintptr_t mlow_ptr, std::uintptr_t s_ptr, std::uintptr_t scale_ptr, int threads) {
  for (auto [ptr, name] : {std::pair{g_ptr, "g"}, {p_ptr, "p"}, {x_ptr, "x"}, {xn2_ptr, "x_sqnorm"},
                           {inv2s2_ptr, "inv_two_sigma_sq"}, {y_ptr, "train"}, {yn2_ptr, "train_sqnorm"},
                           {m_ptr, "running_max"}, {mlow_ptr, "running_max_lower"}, {s_ptr, "running_sum"},
                           {scale_ptr, "scale"}})
    check_ptr(ptr, name);
  check_positive(batch, "batch");
  check_positive(tile, "tile");
  check_positive(dim, "dim");
  check_arg(g_ld >= tile, "g_ld", "row stride of g must be >= tile");
  check_arg(x_ld >= dim && y_ld >= dim, "x_ld/y_ld", "row strides must be >= dim");
  check_arg(gemm_err_coef >= 0 && rounding_coef >= 0 && rescore_tol >= 0 && band > 0,
            "gemm_err_coef/rounding_coef/rescore_tol/band",
            "expected gemm_err_coef >= 0, rounding_coef >= 0, rescore_tol >= 0, band > 0");
  const DType gd = parse_dtype(g_dtype, "g_dtype");
  check_arg(gd == DType::float32 || gd == DType::float64 || gd == DType::bfloat16, "g_dtype",
            "expected float32, float64 or bfloat16, got " + g_dtype);
  const DType y_dtype = train_dtype(y_dtype_name);
  TileArgs a{batch, tile, dim, x_ld, y_ld * element_size(y_dtype), g_ld,
             reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const double*>(xn2_ptr),
             reinterpret_cast<const double*>(inv2s2_ptr), reinterpret_cast<const char*>(y_ptr), y_dtype,
             reinterpret_cast<const double*>(yn2_ptr), gemm_err_coef, rounding_coef, rescore_tol, band,
             reinterpret_cast<double*>(m_ptr), reinterpret_cast<double*>(mlow_ptr), reinterpret_cast<double*>(s_ptr),
             reinterpret_cast<float*>(scale_ptr), reinterpret_cast<float*>(p_ptr)};
  const bool count_only = rescore_budget == kCountOnly;
  check_arg(rescore_budget >= -1 || count_only, "rescore_budget",
            "expected >= 0, -1 (no budget) or -3 (count only), got " + std::to_string(rescore_budget));
  const int64_t budget = count_only ? 0 : rescore_budget;
  if (gd == DType::float32) return run_tile(a, reinterpret_cast<const float*>(g_ptr), budget, count_only, threads);
  if (gd == DType::bfloat16)
    return run_tile(a, reinterpret_cast<const uint16_t*>(g_ptr), budget, count_only, threads);
  return run_tile(a, reinterpret_cast<const double*>(g_ptr), budget, count_only, threads);
}

// Screening with candidate lists (small sigma, one pass of bf16 or float32 Gram tiles: g_dtype).
// For each row, raise m_low with this tile's bounds (max over pairs of l - e) and append to the
// row's list [cap] every pair
// whose upper bound l + e reaches m_low - band (global index start + j, upper bound). A full list is
// pruned against the current cut; a row whose list stays (7/8) full is marked overflowed (count = cap + 1)
// and collects nothing more (its m_low still rises). Returns the number of overflowed rows.
template <typename G>
int64_t screen_collect_rows(const G* g, int64_t g_ld, int64_t batch, int64_t tile, int64_t start, const double* xn2,
                            const double* inv2s2, const double* yn2, double gemm_err_coef, double rounding_coef,
                            double band, double* mlow, int64_t* cand_index, double* cand_upper, int64_t* cand_count,
                            int64_t cap, int threads);

int64_t screen_collect(std::uintptr_t g_ptr, const std::string& g_dtype, int64_t g_ld, int64_t batch, int64_t tile,
                       int64_t start, std::uintptr_t xn2_ptr, std::uintptr_t inv2s2_ptr, std::uintptr_t yn2_ptr,
                       double gemm_err_coef, double rounding_coef, double band, std::uintptr_t mlow_ptr,
                       std::uintptr_t cand_index_ptr,
                       std::uintptr_t cand_upper_ptr, std::uintptr_t cand_count_ptr, int64_t cap, int threads) {
  for (auto [ptr, name] : {std::pair{g_ptr, "g"}, {xn2_ptr, "x_sqnorm"}, {inv2s2_ptr, "inv_two_sigma_sq"},
                           {yn2_ptr, "train_sqnorm"}, {mlow_ptr, "running_max_lower"}, {cand_index_ptr, "cand_index"},
                           {cand_upper_ptr, "cand_upper"}, {cand_count_ptr, "cand_count"}})
    check_ptr(ptr, name);
  check_positive(batch, "batch");
  check_positive(tile, "tile");
  check_positive(cap, "cap");
  check_arg(g_ld >= tile, "g_ld", "row stride of g must be >= tile");
  const DType gd = parse_dtype(g_dtype, "g_dtype");
  check_arg(gd == DType::float32 || gd == DType::bfloat16, "g_dtype", "expected float32 or bfloat16, got " + g_dtype);
  const auto* xn2 = reinterpret_cast<const double*>(xn2_ptr);
  const auto* inv2s2 = reinterpret_cast<const double*>(inv2s2_ptr);
  const auto* yn2 = reinterpret_cast<const double*>(yn2_ptr);
  auto* mlow = reinterpret_cast<double*>(mlow_ptr);
  auto* cand_index = reinterpret_cast<int64_t*>(cand_index_ptr);
  auto* cand_upper = reinterpret_cast<double*>(cand_upper_ptr);
  auto* cand_count = reinterpret_cast<int64_t*>(cand_count_ptr);
  if (gd == DType::bfloat16)
    return screen_collect_rows(reinterpret_cast<const uint16_t*>(g_ptr), g_ld, batch, tile, start, xn2, inv2s2, yn2,
                               gemm_err_coef, rounding_coef, band, mlow, cand_index, cand_upper, cand_count, cap,
                               threads);
  return screen_collect_rows(reinterpret_cast<const float*>(g_ptr), g_ld, batch, tile, start, xn2, inv2s2, yn2,
                             gemm_err_coef, rounding_coef, band, mlow, cand_index, cand_upper, cand_count, cap,
                             threads);
}

template <typename G>
int64_t screen_collect_rows(const G* g, int64_t g_ld, int64_t batch, int64_t tile, int64_t start, const double* xn2,
                            const double* inv2s2, const double* yn2, double gemm_err_coef, double rounding_coef,
                            double band, double* mlow, int64_t* cand_index, double* cand_upper, int64_t* cand_count,
                            int64_t cap, int threads) {
  std::vector<double> ynorm(tile);
  for (int64_t j = 0; j < tile; ++j) ynorm[j] = std::sqrt(yn2[j]);
  int64_t overflowed = 0;
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
#pragma omp parallel num_threads(nthreads) reduction(+ : overflowed) if (batch * tile > kMinParallelWork / 8)
  {
    std::vector<double> upper(tile);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      int64_t& count = cand_count[b];
      const double c = inv2s2[b];
      const double xn = xn2[b];
      const double xnorm = std::sqrt(xn);
      const double err_per_ynorm = 2.0 * gemm_err_coef * xnorm * c;
      const G* grow = g + b * g_ld;
      double lower = mlow[b];
      for (int64_t j = 0; j < tile; ++j) {
        const double l = -(xn + yn2[j] - 2.0 * gram_value(grow[j])) * c;
        const double e = err_per_ynorm * ynorm[j] + rounding_bound(rounding_coef, xnorm, ynorm[j], c);
        upper[j] = l + e;
        lower = std::max(lower, l - e);
      }
      mlow[b] = lower;  // raised for overflowed rows too: their second pass starts from it
      if (count > cap) continue;
      const double cut = lower - band;
      int64_t* index = cand_index + b * cap;
      double* up = cand_upper + b * cap;
      for (int64_t j = 0; j < tile && count <= cap; ++j) {
        if (upper[j] < cut) continue;
        if (count == cap) {  // full: keep only the entries that still reach the cut
          int64_t kept = 0;
          for (int64_t i = 0; i < count; ++i)
            if (up[i] >= cut) index[kept] = index[i], up[kept] = up[i], ++kept;
          count = kept;
          // pruning freed under 1/8 of the list: it is full of real candidates; overflow now rather
          // than pay O(cap) again for each later insertion
          if (count > cap - std::max<int64_t>(1, cap / 8)) {
            count = cap + 1;
            ++overflowed;
            break;
          }
        }
        index[count] = start + j;
        up[count] = upper[j];
        ++count;
      }
    }
  }
  return overflowed;
}

// Error-free transformations (Knuth's two-sum; the two-product through fma), for the excess below.
inline void two_sum(double a, double b, double& s, double& e) {
  s = a + b;
  const double b_virtual = s - a;
  e = (a - (s - b_virtual)) + (b - b_virtual);
}
inline void two_prod(double a, double b, double& p, double& e) {
  p = a * b;
  e = std::fma(a, b, -p);
}

template <typename TY>
double excess_double_double(const float* x, const TY* y, const TY* y_best, int64_t dim) {
  double total = 0, compensation = 0;
  for (int64_t k = 0; k < dim; ++k) {
    const double xk = x[k], yk = value_as_double(y[k]), bk = value_as_double(y_best[k]);
    double p_hi, p_lo, q_hi, q_lo, d_hi, d_lo, s_hi, s_lo, t_hi, t_lo, sum_err;
    two_sum(xk, -yk, p_hi, p_lo);  // p = x - y
    two_sum(xk, -bk, q_hi, q_lo);  // q = x - y_best
    two_sum(p_hi, -q_hi, d_hi, d_lo);
    d_lo += p_lo - q_lo;
    two_sum(p_hi, q_hi, s_hi, s_lo);
    s_lo += p_lo + q_lo;
    two_prod(d_hi, s_hi, t_hi, t_lo);  // (p - q)(p + q) = p^2 - q^2
    t_lo += d_hi * s_lo + d_lo * s_hi;
    two_sum(total, t_hi, total, sum_err);
    compensation += sum_err + t_lo;
  }
  return total + compensation;
}

// Exact sum of doubles (Shewchuk's non-overlapping partials, as Python's math.fsum; no overflow
// handling: the values here are far from it). value() is the sum rounded once more at most.
class ExactSum {
 public:
  void add(double value) {
    size_t kept = 0;
    for (double partial : partials_) {
      if (std::fabs(value) < std::fabs(partial)) std::swap(value, partial);
      const double hi = value + partial;
      const double lo = partial - (hi - value);
      if (lo != 0.0) partials_[kept++] = lo;
      value = hi;
    }
    partials_.resize(kept);
    partials_.push_back(value);
  }
  double value() const {
    double total = 0;
    for (size_t i = partials_.size(); i-- > 0;) total += partials_[i];
    return total;
  }

 private:
  std::vector<double> partials_;
};

// a^2 as the exact sum of six doubles for a = hi + lo, added to `sum` with the sign given.
inline void add_exact_square(double hi, double lo, double sign, ExactSum& sum) {
  double p, e;
  two_prod(hi, hi, p, e);
  sum.add(sign * p), sum.add(sign * e);
  two_prod(2.0 * hi, lo, p, e);
  sum.add(sign * p), sum.add(sign * e);
  two_prod(lo, lo, p, e);
  sum.add(sign * p), sum.add(sign * e);
}

// |x - y|^2 - |x - y_best|^2 exactly (then rounded once): each x - y as an exact two-sum, each
// square as exact products, all summed by ExactSum. For the few pairs at tiny sigma where even the
// double-double excess could move a logit (1e-30 at D = 64: ties summed in different orders).
template <typename TY>
double excess_exact(const float* x, const TY* y, const TY* y_best, int64_t dim) {
  ExactSum sum;
  for (int64_t k = 0; k < dim; ++k) {
    const double yk = value_as_double(y[k]), bk = value_as_double(y_best[k]);
    if (yk == bk) continue;
    double hi, lo;
    two_sum(static_cast<double>(x[k]), -yk, hi, lo);
    add_exact_square(hi, lo, 1.0, sum);
    two_sum(static_cast<double>(x[k]), -bk, hi, lo);
    add_exact_square(hi, lo, -1.0, sum);
  }
  return sum.value();
}

// |x - y|^2 - |x - y_best|^2 = sum_k (p_k - q_k)(p_k + q_k), p = x - y, q = x - y_best, in
// double-double arithmetic (error-free sums and products, compensated sum): exact but for the final
// rounding, where the plain difference of two float64 sums is not (exact ties summed in another
// order, sigma 1e-8 at D = 3072; huge |x|). As diffcore.ref.empirical_denoise computes it.
double excess_row(const float* x, const char* y, const char* y_best, DType y_dtype, int64_t dim, bool exact) {
  if (y_dtype == DType::float32) {
    const auto* yf = reinterpret_cast<const float*>(y);
    const auto* bf = reinterpret_cast<const float*>(y_best);
    return exact ? excess_exact(x, yf, bf, dim) : excess_double_double(x, yf, bf, dim);
  }
  const auto* yu = reinterpret_cast<const uint8_t*>(y);
  const auto* bu = reinterpret_cast<const uint8_t*>(y_best);
  return exact ? excess_exact(x, yu, bu, dim) : excess_double_double(x, yu, bu, dim);
}

// exp(-746) is 0 in float64: a pair this many logits below the best weighs nothing.
constexpr double kZeroWeightLogit = 746.0;
// Logits relative to the best are exact to this (absolute), as in the float64 reference.
constexpr double kExcessLogitTol = 1e-10;

// Candidates' squared distances (float64 sums, in `logit` on entry) -> logits relative to the best
// candidate m, -(|x - y_i|^2 - |x - y_m|^2) c (0 for m and its exact ties): the plain difference
// where its rounding (gamma_{D+3} of both sums) moves no logit by more than kExcessLogitTol or the
// pair weighs nothing, else the double-double excess, or the exact one where the double-double
// error ((D^2 + 8) u^2 of both sums) could. Returns |x - y_m|^2.
double relative_logits(const float* x, const char* ybase, int64_t y_row_bytes, DType y_dtype, int64_t dim, double c,
                       const std::vector<int64_t>& rows, std::vector<double>& logit) {
  size_t best = 0;
  for (size_t i = 1; i < logit.size(); ++i)
    if (logit[i] < logit[best]) best = i;
  const double best_sqdist = logit[best];
  const double unit = std::ldexp(1.0, -53), terms = static_cast<double>(dim + 3);
  const double gamma = terms * unit / (1.0 - terms * unit);
  const double dd_error = (static_cast<double>(dim) * dim + 8.0) * unit * unit;
  const char* y_best = ybase + rows[best] * y_row_bytes;
  for (size_t i = 0; i < logit.size(); ++i) {
    const double excess = std::max(0.0, logit[i] - best_sqdist);
    const double sums = logit[i] + best_sqdist;
    const double rounding = gamma * sums;
    if (i != best && rounding * c > kExcessLogitTol && (excess - rounding) * c <= kZeroWeightLogit)
      logit[i] = -excess_row(x, ybase + rows[i] * y_row_bytes, y_best, y_dtype, dim,
                             dd_error * sums * c > kExcessLogitTol) * c;
    else
      logit[i] = -excess * c;
  }
  return best_sqdist;
}

// Final step of the candidate-list screening: per row whose list did not overflow, exact logits
// (difference first, float64; relative to the best candidate, in double-double where float64 is
// not enough: relative_logits) of the candidates whose upper bound reaches m_low - band, then
// out[row_map[b]] = sum softmax(l) y and logz[row_map[b]] = logsumexp(l) over them (the pairs left
// out weigh < exp(-band) of the largest weight).
void screen_finalize(std::uintptr_t x_ptr, int64_t x_ld, int64_t batch, int64_t dim, std::uintptr_t inv2s2_ptr,
                     std::uintptr_t y_ptr, const std::string& y_dtype_name, int64_t y_ld, std::uintptr_t mlow_ptr,
                     std::uintptr_t cand_index_ptr, std::uintptr_t cand_upper_ptr, std::uintptr_t cand_count_ptr,
                     int64_t cap, double band, std::uintptr_t row_map_ptr, std::uintptr_t out_ptr,
                     std::uintptr_t logz_ptr, int threads) {
  for (auto [ptr, name] : {std::pair{x_ptr, "x"}, {inv2s2_ptr, "inv_two_sigma_sq"}, {y_ptr, "train"},
                           {mlow_ptr, "running_max_lower"}, {cand_index_ptr, "cand_index"},
                           {cand_upper_ptr, "cand_upper"}, {cand_count_ptr, "cand_count"}, {row_map_ptr, "row_map"},
                           {out_ptr, "out"}, {logz_ptr, "logz"}})
    check_ptr(ptr, name);
  check_positive(batch, "batch");
  check_positive(dim, "dim");
  check_positive(cap, "cap");
  const DType y_dtype = train_dtype(y_dtype_name);
  const auto* x = reinterpret_cast<const float*>(x_ptr);
  const auto* inv2s2 = reinterpret_cast<const double*>(inv2s2_ptr);
  const auto* ybase = reinterpret_cast<const char*>(y_ptr);
  const auto* mlow = reinterpret_cast<const double*>(mlow_ptr);
  const auto* cand_index = reinterpret_cast<const int64_t*>(cand_index_ptr);
  const auto* cand_upper = reinterpret_cast<const double*>(cand_upper_ptr);
  const auto* cand_count = reinterpret_cast<const int64_t*>(cand_count_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  auto* logz = reinterpret_cast<double*>(logz_ptr);
  const auto* row_map = reinterpret_cast<const int64_t*>(row_map_ptr);
  const int64_t y_row_bytes = y_ld * element_size(y_dtype);
  const double* table = pixel_table().value;
  for (int64_t b = 0; b < batch; ++b)
    check_arg(cand_count[b] >= 1, "cand_count", "every row has at least one candidate (its nearest point)");
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
#pragma omp parallel num_threads(nthreads) if (batch * dim > kMinParallelWork / 8)
  {
    std::vector<double> logit, acc(dim);
    std::vector<int64_t> rows;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      if (cand_count[b] > cap) continue;  // overflowed: finished elsewhere
      const double c = inv2s2[b];
      const double cut = mlow[b] - band;
      const float* xrow = x + b * x_ld;
      logit.clear();
      rows.clear();
      for (int64_t i = 0; i < cand_count[b]; ++i) {
        if (cand_upper[b * cap + i] < cut) continue;
        const int64_t r = cand_index[b * cap + i];
        logit.push_back(exact_sqdist_row(xrow, ybase + r * y_row_bytes, y_dtype, dim));  // distance for now
        rows.push_back(r);
      }
      const double best_sqdist = relative_logits(xrow, ybase, y_row_bytes, y_dtype, dim, c, rows, logit);
      double mx = -std::numeric_limits<double>::infinity();
      for (const double l : logit) mx = std::max(mx, l);
      std::fill(acc.begin(), acc.end(), 0.0);
      double sum = 0;
      for (size_t i = 0; i < rows.size(); ++i) {
        const double w = std::exp(logit[i] - mx);
        if (w == 0.0) continue;
        sum += w;
        const char* yrow = ybase + rows[i] * y_row_bytes;
        if (y_dtype == DType::float32) {
          const auto* yf = reinterpret_cast<const float*>(yrow);
          for (int64_t k = 0; k < dim; ++k) acc[k] += w * static_cast<double>(yf[k]);
        } else {
          const auto* yu = reinterpret_cast<const uint8_t*>(yrow);
          for (int64_t k = 0; k < dim; ++k) acc[k] += w * table[yu[k]];
        }
      }
      float* orow = out + row_map[b] * dim;
      for (int64_t k = 0; k < dim; ++k) orow[k] = static_cast<float>(acc[k] / sum);
      logz[row_map[b]] = -best_sqdist * c + mx + std::log(sum);
    }
  }
}

// acc[b] = acc[b] * scale[b] + sum_j P[b, j] y_j over the nonzero weights only (small sigma).
void sparse_accumulate(std::uintptr_t p_ptr, int64_t p_ld, int64_t batch, int64_t tile, std::uintptr_t scale_ptr,
                       std::uintptr_t y_ptr, const std::string& y_dtype_name, int64_t y_ld, int64_t dim,
                       std::uintptr_t acc_ptr, int64_t acc_ld, int threads) {
  for (auto [p, name] : {std::pair{p_ptr, "p"}, {scale_ptr, "scale"}, {y_ptr, "train"}, {acc_ptr, "acc"}})
    check_ptr(p, name);
  check_positive(batch, "batch");
  check_positive(tile, "tile");
  check_positive(dim, "dim");
  const DType y_dtype = train_dtype(y_dtype_name);
  const auto* pw = reinterpret_cast<const float*>(p_ptr);
  const auto* scale = reinterpret_cast<const float*>(scale_ptr);
  const auto* ybase = reinterpret_cast<const char*>(y_ptr);
  auto* acc = reinterpret_cast<float*>(acc_ptr);
  const int64_t y_row_bytes = y_ld * element_size(y_dtype);
  float table[256];
  for (int u = 0; u < 256; ++u) table[u] = static_cast<float>(pixel_table().value[u]);
  const int nthreads = resolve_threads(threads);
  (void)nthreads;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (batch * dim > kMinParallelWork)
  for (int64_t b = 0; b < batch; ++b) {
    float* arow = acc + b * acc_ld;
    const float a = scale[b];
    if (a != 1.0f) {
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) arow[i] *= a;
    }
    const float* prow = pw + b * p_ld;
    for (int64_t j = 0; j < tile; ++j) {
      const float w = prow[j];
      if (w == 0.0f) continue;
      const char* yrow = ybase + j * y_row_bytes;
      if (y_dtype == DType::float32) {
        const auto* yf = reinterpret_cast<const float*>(yrow);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) arow[i] += w * yf[i];
      } else {
        const auto* yu = reinterpret_cast<const uint8_t*>(yrow);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) arow[i] += w * table[yu[i]];
      }
    }
  }
}

void cuda_forward(std::uintptr_t x_ptr, const std::string& x_dtype, std::uintptr_t y_ptr, const std::string& y_dtype,
                  std::uintptr_t inv2s2_ptr, int64_t batch, int64_t rows, int64_t dim, int64_t splits,
                  std::uintptr_t work_acc_ptr, std::uintptr_t work_m_ptr, std::uintptr_t work_s_ptr,
                  std::uintptr_t out_ptr, std::uintptr_t logz_ptr, int device, std::uintptr_t stream) {
#ifdef DIFFCORE_WITH_CUDA
  for (auto [p, name] : {std::pair{x_ptr, "x"}, {y_ptr, "train"}, {inv2s2_ptr, "inv_two_sigma_sq"},
                         {work_acc_ptr, "work_acc"}, {work_m_ptr, "work_max"}, {work_s_ptr, "work_sum"},
                         {out_ptr, "out"}, {logz_ptr, "logz"}})
    check_ptr(p, name);
  check_positive(batch, "batch");
  check_positive(rows, "rows");
  check_positive(dim, "dim");
  check_positive(splits, "splits");
  const DType xd = parse_dtype(x_dtype, "x_dtype");
  const DType yd = parse_dtype(y_dtype, "train_dtype");
  check_arg(xd == DType::float32 || xd == DType::float16 || xd == DType::bfloat16, "x_dtype",
            "expected float32, float16 or bfloat16, got " + x_dtype);
  check_arg(yd == DType::float32 || yd == DType::float16 || yd == DType::bfloat16 || yd == DType::uint8,
            "train_dtype", "expected float32, float16, bfloat16 or uint8, got " + y_dtype);
  empirical_denoise_cuda_forward(reinterpret_cast<const void*>(x_ptr), xd, reinterpret_cast<const void*>(y_ptr), yd,
                                 reinterpret_cast<const double*>(inv2s2_ptr), batch, rows, dim, splits,
                                 reinterpret_cast<float*>(work_acc_ptr), reinterpret_cast<double*>(work_m_ptr),
                                 reinterpret_cast<double*>(work_s_ptr), reinterpret_cast<void*>(out_ptr),
                                 reinterpret_cast<float*>(logz_ptr), device, reinterpret_cast<void*>(stream));
#else
  (void)x_ptr, (void)x_dtype, (void)y_ptr, (void)y_dtype, (void)inv2s2_ptr, (void)batch, (void)rows, (void)dim;
  (void)splits, (void)work_acc_ptr, (void)work_m_ptr, (void)work_s_ptr, (void)out_ptr, (void)logz_ptr;
  (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: empirical_denoise_cuda_forward: diffcore._C was built without CUDA");
#endif
}

void register_empirical_denoise(py::module_& m) {
  // The candidate lists screen_collect fills and screen_finalize reads (one layout, spelled once).
  const auto candidates = keywords("cand_index_ptr", "cand_upper_ptr", "cand_count_ptr", "cap");
  def_keyword_only(m, "empirical_denoise_row_sqnorms", &row_sqnorms,
                   keywords("y_ptr", "dtype", "rows", "dim", "ld", "out_ptr", "threads"),
                   "|y_i|^2 (double) of rows float32/uint8 (uint8 as u/127.5-1).");
  def_keyword_only(m, "empirical_denoise_decode_rows", &decode_rows,
                   keywords("src_ptr", "src_dtype", "rows", "dim", "dst_ptr", "dst_dtype", "threads"),
                   "float32/uint8 rows (uint8 as u/127.5-1) into a float32 or bfloat16 buffer (one rounding).");
  def_keyword_only(m, "empirical_denoise_tile_update", &tile_update,
                   keywords("g_ptr", "g_dtype", "g_ld", "p_ptr", "batch", "tile", "x_ptr", "x_ld", "dim", "xn2_ptr",
                            "inv2s2_ptr", "y_ptr", "y_dtype", "y_ld", "yn2_ptr", "gemm_err_coef", "rounding_coef",
                            "rescore_tol", "band", "rescore_budget", "m_ptr", "mlow_ptr", "s_ptr", "scale_ptr",
                            "threads"),
                   "One training tile of the empirical denoiser: G -> weights P, running log-sum-exp update. "
                   "Returns (nonzero weights, re-scored pairs), or (-1, wanted) when more than rescore_budget "
                   "pairs would need exact re-scoring (nothing written). rescore_budget=-1: no budget; -3: only "
                   "count the pairs that would be re-scored, returning (-1, count).");
  def_keyword_only(m, "empirical_denoise_screen_collect", &screen_collect,
                   std::tuple_cat(keywords("g_ptr", "g_dtype", "g_ld", "batch", "tile", "start", "xn2_ptr",
                                           "inv2s2_ptr", "yn2_ptr", "gemm_err_coef", "rounding_coef", "band",
                                           "mlow_ptr"),
                                  candidates, keywords("threads")),
                   "Screening pass over one tile of a bf16 or float32 Gram matrix: raise the lower bound of each "
                   "row's max logit and collect the candidate pairs; returns the number of rows whose list "
                   "overflowed.");
  def_keyword_only(m, "empirical_denoise_screen_finalize", &screen_finalize,
                   std::tuple_cat(keywords("x_ptr", "x_ld", "batch", "dim", "inv2s2_ptr", "y_ptr", "y_dtype", "y_ld",
                                           "mlow_ptr"),
                                  candidates, keywords("band", "row_map_ptr", "out_ptr", "logz_ptr", "threads")),
                   "Exact re-scoring of the collected candidates: out [B, D] float32 and logz [B] float64.");
  def_keyword_only(m, "empirical_denoise_sparse_accumulate", &sparse_accumulate,
                   keywords("p_ptr", "p_ld", "batch", "tile", "scale_ptr", "y_ptr", "y_dtype", "y_ld", "dim",
                            "acc_ptr", "acc_ld", "threads"),
                   "acc = acc * scale + P @ tile over the nonzero weights of P only.");
  def_keyword_only(m, "empirical_denoise_cuda_forward", &cuda_forward,
                   keywords("x_ptr", "x_dtype", "y_ptr", "y_dtype", "inv2s2_ptr", "batch", "rows", "dim", "splits",
                            "work_acc_ptr", "work_m_ptr", "work_s_ptr", "out_ptr", "logz_ptr", "device", "stream"),
                   "CUDA empirical denoiser (exact double distances, split over the training set, log-sum-exp "
                   "merge).");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(empirical_denoise, diffcore::register_empirical_denoise);
