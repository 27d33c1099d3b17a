// Exact k-nearest-neighbour search (l2) on the CPU: screening with an int8, bf16 or fp32 GEMM
// plus an error bound, exact re-scoring of the survivors in double, fused top-k merge.
//
// Division of labour (docs/design.md, Backends and auto): Python drives torch's GEMM for the Gram tile
// G~ = s(Q) s(Y)^T, s the screening precision (diffcore/_cpu_caps.py: int8 where torch's int8
// GEMM is exact at the ranges used, else bf16 where the CPU has native bf16 matmul, else fp32);
// this file
//   1. knn_cpu_prepare_rows: converts rows to the screening precision (bf16/fp32: round to nearest
//      even; int8: q = round(x / s) with one scale s = max|x| / levels per row, x~ = s q) and
//      records, per row, |x|^2 (exact, double), |x~|, |x - x~| and s (1 for bf16/fp32), and
//      rejects NaN/Inf (fp32 rows screened in fp32 are not copied: x~ = x);
//   2. knn_cpu_screen_tile: for every query of a block and every training row of a tile, bounds
//      the exact squared distance d^2 = |q|^2 + |y|^2 - 2 q.y from below by lower = a - 2E,
//      where a = |q|^2 + |y|^2 - 2 G~ and E bounds |G~ - q.y| (below), in one float pass with a
//      proven margin (float_lower_bounds) that also keeps each 32-row block's minimum; on a
//      query's first tile it re-scores the k rows of smallest lower bound, so that the cut is an
//      exact k-th distance; then it re-scores exactly (difference first, double accumulation)
//      every row whose lower bound reaches the current k-th best exact distance and merges it into
//      the per-query top-k, ordered by (distance, index).
//
// Error bound of the screening Gram entry (q = q~ + dq exactly):
//   q.y = q~.y~ + q~.dy + dq.y~ + dq.dy
//   |q~.dy + dq.y~ + dq.dy| <= |q~||dy| + |dq||y~| + |dq||dy|          (Cauchy-Schwarz)
//   int8 screen: G~ = s_q s_y (integer sum), exact in int32 for dim * 127^2 < 2^31 in any
//     summation order (that torch's int8 GEMM does not saturate its intermediates at the value
//     ranges used is checked by a probe in Python, which picks 7-bit training rows where needed);
//   fp32 accumulation, ANY summation order (Higham, Accuracy and Stability, Eq. 3.5):
//     |acc - q~.y~| <= gamma_D |q~|.|y~| <= gamma_D |q~||y~|, gamma_D = D 2^-24 / (1 - D 2^-24)
//   bf16 output rounding (torch returns bf16 on the CPU): |G~ - acc| <= 2^-8 |G~|; none for fp32.
// E is the sum, plus a tiny absolute term for flushed subnormals and double rounding.
// fp32 and int8 screens: every term is proven (exact inputs, IEEE fp32 or integer arithmetic).
// bf16 screen: that the BLAS accumulates bf16 products in fp32 and rounds the output once is
// assumed (checked by a probe in Python), so the two GEMM terms get a safety factor.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/distance.h"
#include "common/registry.h"
#include "knn/knn_cuda.h"

namespace py = pybind11;

namespace diffcore {
namespace {


// float -> bf16 bits, round to nearest even (inputs are finite: checked before).
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Largest magnitude accepted: keeps every product and sum of the fp32 GEMM far from overflow.
constexpr double kMaxMagnitude = 1e15;
// Longest rows the int8 screen takes: dim * 127 * 127 < 2^31 keeps every int32 Gram sum exact.
constexpr int64_t kInt8MaxDim = 133143;

// Screening formats. bf16 (raw bits) and fp32 round each value to nearest even; int8 stores
// round(x / s) with one scale s = max|x| / levels per row (x~ = s q). A format object is made per
// row (for_row) because the int8 scale depends on the row; bf16 and fp32 ignore levels.
struct Bf16Format {
  using Storage = uint16_t;
  template <typename T>
  static Bf16Format for_row(const T*, int64_t, int) { return {}; }
  Storage encode(double v) const { return float_to_bf16_bits(static_cast<float>(v)); }
  double decode(Storage h) const { return bf16_bits_to_float(h); }
  double scale() const { return 1.0; }
};
struct Fp32Format {
  using Storage = float;
  template <typename T>
  static Fp32Format for_row(const T*, int64_t, int) { return {}; }
  Storage encode(double v) const { return static_cast<float>(v); }
  double decode(Storage f) const { return f; }
  double scale() const { return 1.0; }
};
// levels = 127, or 63 where the int8 GEMM needs 7-bit values to stay exact (python/diffcore/_cpu_caps.py).
struct Int8Format {
  using Storage = int8_t;
  double step = 1.0, inverse = 1.0;
  template <typename T>
  static Int8Format for_row(const T* x, int64_t dim, int levels) {
    double largest = 0;  // exact in any order (vectorized: a serial vmaxsd chain was 40% of the row)
#pragma omp simd reduction(max : largest)
    for (int64_t i = 0; i < dim; ++i) largest = std::max(largest, std::fabs(value_as_double(x[i])));
    // NaN/Inf rows are rejected by the caller; they only need a finite step here
    if (!(largest > 0) || !std::isfinite(largest)) return {};
    return {largest / levels, levels / largest};
  }
  // |v / step| <= levels (up to one rounding), so the rounded value fits in [-levels, levels].
  // Rounded to nearest by adding and subtracting 1.5 * 2^52 (exact for |v / step| < 2^51; it
  // vectorizes, std::nearbyint did not). Any integer would do for the bound: the rounding of each
  // row is measured from the stored values (|x - x~|), not assumed.
  double level(double v) const {  // the stored integer q, as a double
    constexpr double kRoundToInteger = 0x1.8p52;
    const double rounded = (v * inverse + kRoundToInteger) - kRoundToInteger;
    return std::max(-127.0, std::min(127.0, rounded));
  }
  Storage encode(double v) const { return static_cast<Storage>(static_cast<int32_t>(level(v))); }
  double decode(Storage q) const { return step * q; }
  double scale() const { return step; }
};

// Per row: copy in the screening format (skipped when dst is null: the rows are used as they are,
// x~ = x) and [|x|^2, |x~|, |x - x~|, s] (s: the int8 scale, 1 otherwise). Returns the first
// offending row or -1.
constexpr int64_t kNormColumns = 4;

// One row: [|x|^2, |x~|^2, |x - x~|^2] and the count of values that are NaN, Inf or above
// kMaxMagnitude; stores x~ when kStore (two instantiations: a conditional store kept the loop scalar).
template <bool kStore, typename Format, typename T>
inline void prepare_row(const T* x, int64_t dim, const Format& format, typename Format::Storage* out, double& sq,
                        double& sq_rounded, double& sq_delta, int64_t& n_bad) {
  double a = 0, b = 0, c = 0;
  int64_t bad = 0;
#pragma omp simd reduction(+ : a, b, c, bad)
  for (int64_t i = 0; i < dim; ++i) {
    const double v = value_as_double(x[i]);
    bad += !(std::fabs(v) <= kMaxMagnitude);  // true for NaN and Inf too
    double rounded;
    if constexpr (std::is_same_v<Format, Int8Format>) {  // decoded from the integer-valued double: same value
      const double level = format.level(v);
      rounded = format.step * level;
      if constexpr (kStore) out[i] = static_cast<int8_t>(static_cast<int32_t>(level));
    } else {
      const typename Format::Storage h = format.encode(v);
      rounded = format.decode(h);
      if constexpr (kStore) out[i] = h;
    }
    a += v * v;
    b += rounded * rounded;
    c += (v - rounded) * (v - rounded);
  }
  sq = a, sq_rounded = b, sq_delta = c, n_bad = bad;
}

template <typename Format, typename T>
int64_t prepare_rows(const T* src, int64_t rows, int64_t dim, int64_t row_stride, typename Format::Storage* dst,
                     double* norms, int threads, int levels) {
  int64_t bad_row = -1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* x = src + r * row_stride;
    const Format format = Format::for_row(x, dim, levels);
    double sq = 0, sq_rounded = 0, sq_delta = 0;
    int64_t n_bad = 0;
    if (dst != nullptr)
      prepare_row<true>(x, dim, format, dst + r * dim, sq, sq_rounded, sq_delta, n_bad);
    else
      prepare_row<false>(x, dim, format, nullptr, sq, sq_rounded, sq_delta, n_bad);
    double* row_norms = norms + kNormColumns * r;
    row_norms[0] = sq;
    row_norms[1] = std::sqrt(sq_rounded);
    row_norms[2] = std::sqrt(sq_delta);
    row_norms[3] = format.scale();
    if (n_bad != 0) {
#pragma omp critical
      if (bad_row < 0 || r < bad_row) bad_row = r;
    }
  }
  return bad_row;
}

template <typename Format>
int64_t prepare_rows_dispatch(std::uintptr_t src_ptr, DType dtype, int64_t rows, int64_t dim, int64_t row_stride,
                              std::uintptr_t dst_ptr, double* norms, int threads, int levels,
                              const std::string& arg_name) {
  auto* dst = reinterpret_cast<typename Format::Storage*>(dst_ptr);
  switch (dtype) {
    case DType::float32:
      return prepare_rows<Format>(reinterpret_cast<const float*>(src_ptr), rows, dim, row_stride, dst, norms, threads,
                                  levels);
    case DType::float64:
      return prepare_rows<Format>(reinterpret_cast<const double*>(src_ptr), rows, dim, row_stride, dst, norms, threads,
                                  levels);
    case DType::uint8:
      return prepare_rows<Format>(reinterpret_cast<const uint8_t*>(src_ptr), rows, dim, row_stride, dst, norms,
                                  threads, levels);
    default:
      fail_arg(arg_name, "expected float32, float64 or uint8 data");
  }
}

void knn_cpu_prepare_rows(std::uintptr_t src_ptr, const std::string& dtype, int64_t rows, int64_t dim,
                          int64_t row_stride, std::uintptr_t dst_ptr, const std::string& dst_dtype, int64_t int8_levels,
                          std::uintptr_t norms_ptr, int threads, const std::string& arg_name) {
  check_ptr(src_ptr, arg_name);
  check_ptr(norms_ptr, "norms");
  check_positive(rows, "rows");
  check_positive(dim, "dim");
  check_arg(row_stride >= dim, "row_stride", "expected row_stride >= dim (rows stored contiguously)");
  threads = resolve_threads(threads);
  const DType src_type = parse_dtype(dtype, arg_name);
  const DType format = parse_dtype(dst_dtype, "dst_dtype");
  check_arg(format == DType::bfloat16 || format == DType::float32 || format == DType::int8, "dst_dtype",
            "expected bfloat16, float32 or int8 (the screening precision), got " + dst_dtype);
  check_arg(dst_ptr != 0 || (format == DType::float32 && src_type == DType::float32), "dst_ptr",
            "may be null (no copy) only for float32 rows screened in float32");
  check_arg(format != DType::int8 || (int8_levels >= 1 && int8_levels <= 127), "int8_levels",
            "expected 1..127 (the largest int8 magnitude of the screening copy)");
  auto* norms = reinterpret_cast<double*>(norms_ptr);
  const int levels = static_cast<int>(int8_levels);
  const int64_t bad =
      format == DType::bfloat16
          ? prepare_rows_dispatch<Bf16Format>(src_ptr, src_type, rows, dim, row_stride, dst_ptr, norms, threads,
                                              levels, arg_name)
      : format == DType::float32
          ? prepare_rows_dispatch<Fp32Format>(src_ptr, src_type, rows, dim, row_stride, dst_ptr, norms, threads,
                                              levels, arg_name)
          : prepare_rows_dispatch<Int8Format>(src_ptr, src_type, rows, dim, row_stride, dst_ptr, norms, threads,
                                              levels, arg_name);
  if (bad >= 0) {
    std::ostringstream msg;
    msg << "contains NaN, Inf or a value of magnitude above 1e15 (row " << bad << " of this block)";
    fail_arg(arg_name, msg.str());
  }
}

// ----------------------------------------------------------------------------------------------
// Per-query top-k, sorted ascending by (squared distance, index).
struct TopK {
  double* d2;
  int64_t* idx;
  int64_t k;

  double kth() const { return d2[k - 1]; }

  void insert(double dist2, int64_t index) {
    if (!(dist2 < d2[k - 1] || (dist2 == d2[k - 1] && index < idx[k - 1]))) return;
    int64_t pos = k - 1;
    while (pos > 0 && (dist2 < d2[pos - 1] || (dist2 == d2[pos - 1] && index < idx[pos - 1]))) {
      d2[pos] = d2[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    d2[pos] = dist2;
    idx[pos] = index;
  }
};

struct ScreenBound {
  double gamma;     // fp32 accumulation over dim terms (any summation order)
  double unit;      // unit roundoff of the output: 2^-8 for bf16, 0 for fp32
  double safety;    // multiplies the GEMM's own error terms (1: proven, fp32 screen)
  double absolute;  // flushed subnormals and double rounding of the approximation
};

// Bounds of one query's squared distance to the rows of a tile: the slack 2 * safety * E (+ the
// absolute term) around approx = |q|^2 + |y|^2 - 2 G~ (see the top of this file).
inline double gram_value(uint16_t bf16_bits) { return bf16_bits_to_float(bf16_bits); }
inline double gram_value(float value) { return value; }
inline double gram_value(int32_t value) { return value; }  // exact; scaled by s_q s_y below

// The training rows' norm columns (kNormColumns interleaved per row in y_norms) as separate
// contiguous arrays, so that the per-pair bound below vectorizes with plain loads (no gathers).
struct NormColumns {
  std::vector<double> values;  // [kNormColumns, tile]
  const double* col[kNormColumns];
  NormColumns(const double* y_norms, int64_t tile) : values(static_cast<size_t>(kNormColumns * tile)) {
    for (int64_t c = 0; c < kNormColumns; ++c) col[c] = values.data() + c * tile;
    for (int64_t j = 0; j < tile; ++j)
      for (int64_t c = 0; c < kNormColumns; ++c) values[c * tile + j] = y_norms[kNormColumns * j + c];
  }
};

template <typename G>
struct QueryBounds {
  double qn, q_round, q_delta, q_scale;
  const double* yn0;  // |y|^2 (exact), |y~|, |y - y~|, s_y: the columns of NormColumns
  const double* yn1;
  const double* yn2;
  const double* yn3;
  const G* g_row;
  const ScreenBound* bound;

  inline void at(int64_t j, double& approx, double& slack) const {
    const double g = q_scale * yn3[j] * gram_value(g_row[j]);  // scales are 1 except for the int8 screen
    approx = qn + yn0[j] - 2.0 * g;
    // input rounding: proven from the measured norms (Cauchy-Schwarz); the GEMM's own error
    // (fp32 accumulation, bf16 output) is what is assumed of the BLAS, so the safety factor is there
    const double proven = (q_round * yn2[j] + q_delta * yn1[j] + q_delta * yn2[j]) * (1.0 + 1e-12);
    if constexpr (std::is_same_v<G, int32_t>) {
      // int8 screen: exact Gram (gamma = unit = 0), so the assumed term is exactly 0: same value
      slack = 2.0 * proven + bound->absolute * (1.0 + qn + yn0[j]);
    } else if constexpr (std::is_same_v<G, float>) {
      // fp32 screen: no output rounding (unit = 0), so the unit term is exactly 0: same value
      const double assumed = bound->gamma * q_round * yn1[j];
      slack = 2.0 * (proven + bound->safety * assumed) + bound->absolute * (1.0 + qn + yn0[j]);
    } else {
      const double assumed = bound->gamma * q_round * yn1[j] + bound->unit * std::fabs(g);
      slack = 2.0 * (proven + bound->safety * assumed) + bound->absolute * (1.0 + qn + yn0[j]);
    }
  }
};

// ----------------------------------------------------------------------------------------------
// The lower bounds in float (8 lanes of AVX2 instead of 4 doubles: the double bounds
// pass was 80% of knn's time at the digits' all-pairs shape). The lower bound of QueryBounds,
//   lower_j = A + P_j - sigma w_j - beta yd_j - gamma' yr_j - kappa |w_j|,   w_j = s_j G~_j,
// with per query A = |q|^2 - abs (1 + |q|^2) - M_q, sigma = 2 s_q, beta = 2 c (|q~| + |dq|),
// gamma' = 2 c |dq| + 2 S gamma_D |q~|, kappa = 2 S u_out s_q (c = 1 + 1e-12, S the safety factor)
// and per row P_j = |y_j|^2 (1 - abs) - M_j, is the same expression regrouped, less the margin
// M_q + M_j. Evaluated in float, each of its terms passes through at most 10 roundings (the float
// copies of the coefficients and row terms, the conversion and scaling of G~, every product and
// sum, fused or not), so the evaluated value is within gamma_10 < 10.01 * 2^-24 of the sum of the
// terms' magnitudes (Higham, Eq. 3.5 applied term by term), and that sum is at most C_q + C_j with
//   C_q = abs + 1.01 |q|^2 + (3.1 + S gamma_D) |q~|^2 + 2.1 |dq|^2, C_j = the same of the row
// without abs (|G~| <= 2.01 |q~||y~| and 2ab <= a^2 + b^2 for every product of norms; abs = 1e-12,
// the absolute term of A). The margin M = 2^-20 (C_q + C_j) = 16 * 2^-24 (C_q + C_j) covers it,
// and its absolute part (at least 2^-20 abs, about 1e-18) covers the absolute errors of float
// underflow (at most 2^-150 per operation, below 2^-143 in all): the float value is at most the
// double bound, so a row dropped here is dropped by the proof. A query whose terms could overflow
// float (C_q + max C_j above kFloatBoundLimit) takes the double bounds of QueryBounds instead.
constexpr double kFloatBoundMargin = 0x1p-20;
constexpr double kFloatBoundLimit = 1e36;
constexpr double kProvenSlack = 1.0 + 1e-12;  // the (1 + 1e-12) of QueryBounds::at

inline float gram_float(uint16_t bf16_bits) { return bf16_bits_to_float(bf16_bits); }
inline float gram_float(float value) { return value; }
inline float gram_float(int32_t value) { return static_cast<float>(value); }  // exact below 2^24

// The smallest float >= value (value finite or +inf): a cut rounded up never drops a row the
// double cut keeps.
inline float float_at_least(double value) {
  float f = static_cast<float>(value);
  if (static_cast<double>(f) < value) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// The training rows' float terms of the bound (see above), contiguous per term.
struct RowTerms {
  std::vector<float> p, yd, yr, s;
  double largest_c = 0;  // max over rows of C_j
  RowTerms(const double* y_norms, int64_t tile, double assumed, double absolute)
      : p(tile), yd(tile), yr(tile), s(tile) {
    for (int64_t j = 0; j < tile; ++j) {
      const double* n = y_norms + kNormColumns * j;
      const double c = 1.01 * n[0] + (3.1 + assumed) * n[1] * n[1] + 2.1 * n[2] * n[2];
      largest_c = std::max(largest_c, c);
      p[j] = static_cast<float>(n[0] * (1.0 - absolute) - kFloatBoundMargin * c);
      yd[j] = static_cast<float>(n[2]);
      yr[j] = static_cast<float>(n[1]);
      s[j] = static_cast<float>(n[3]);
    }
  }
};

// Rows per block of the lower-bound arrays: each block's minimum is kept beside them, so that the
// selection and the cut below look at one value per block and open a block only when it can hold
// a row they need.
constexpr int64_t kBoundBlock = 32;

// lower[j] for the rows of a tile, in float (kappa: 0 except for the bf16 screen's output
// rounding), and block_min[i] = min of lower over block i (kBoundBlock rows; the last may be short).
template <bool kOutputRounding, typename G>
inline void float_lower_bounds(const RowTerms& rows, const G* g_row, int64_t tile, float a, float sigma, float beta,
                               float gamma, float kappa, float* lower, float* block_min) {
  const float* p = rows.p.data();
  const float* yd = rows.yd.data();
  const float* yr = rows.yr.data();
  const float* s = rows.s.data();
  for (int64_t j0 = 0; j0 < tile; j0 += kBoundBlock) {
    const int64_t n = std::min(kBoundBlock, tile - j0);
    float smallest = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : smallest)
    for (int64_t j = j0; j < j0 + n; ++j) {
      const float w = s[j] * gram_float(g_row[j]);
      float t = (a + p[j]) - sigma * w;
      t = t - beta * yd[j];
      t = t - gamma * yr[j];
      if constexpr (kOutputRounding) t = t - kappa * std::fabs(w);
      lower[j] = t;
      smallest = std::min(smallest, t);
    }
    block_min[j0 / kBoundBlock] = smallest;
  }
}

// The same with the double bounds (queries whose float terms could overflow).
template <typename G>
inline void double_lower_bounds(const QueryBounds<G>& qb, int64_t tile, double* lower, double* block_min) {
  for (int64_t j0 = 0; j0 < tile; j0 += kBoundBlock) {
    const int64_t n = std::min(kBoundBlock, tile - j0);
    double smallest = std::numeric_limits<double>::infinity();
    for (int64_t j = j0; j < j0 + n; ++j) {
      double approx, slack;
      qb.at(j, approx, slack);
      lower[j] = approx - slack;
      smallest = std::min(smallest, lower[j]);
    }
    block_min[j0 / kBoundBlock] = smallest;
  }
}

// Inserts (value, index) into the ascending list (values, chosen) of k entries (unfilled entries:
// value +inf, index -1; every value inserted is finite).
template <typename T>
inline void insert_smallest(T value, int64_t index, int64_t k, T* values, int64_t* chosen) {
  if (!(value < values[k - 1])) return;
  int64_t pos = k - 1;
  while (pos > 0 && value < values[pos - 1]) {
    values[pos] = values[pos - 1];
    chosen[pos] = chosen[pos - 1];
    --pos;
  }
  values[pos] = value;
  chosen[pos] = index;
}

// Indices of the k smallest values of lower[0..tile) into `chosen` (all rows when the tile has
// fewer). They lie in the k blocks of smallest minimum (a row outside them has k block minima,
// k distinct rows, at or below it), so only those blocks are opened. `values` and `opened`: scratch.
template <typename T>
inline void k_smallest(const T* lower, const T* block_min, int64_t tile, int64_t k, std::vector<T>& values,
                       std::vector<int64_t>& opened, std::vector<int64_t>& chosen) {
  const int64_t blocks = (tile + kBoundBlock - 1) / kBoundBlock;
  constexpr T kNone = std::numeric_limits<T>::infinity();
  values.assign(k, kNone);
  opened.assign(k, -1);
  for (int64_t i = 0; i < blocks; ++i) insert_smallest(block_min[i], i, k, values.data(), opened.data());
  values.assign(k, kNone);
  chosen.assign(k, -1);
  for (const int64_t i : opened) {
    if (i < 0) break;
    const int64_t end = std::min(tile, (i + 1) * kBoundBlock);
    for (int64_t j = i * kBoundBlock; j < end; ++j) insert_smallest(lower[j], j, k, values.data(), chosen.data());
  }
  while (!chosen.empty() && chosen.back() < 0) chosen.pop_back();
}

// Re-scores every row whose lower bound reaches the cut (a block whose minimum does not is
// skipped), except the rows of `done` (re-scored already), and merges them into the top-k.
// `cut_of` maps the top-k's k-th value to the cut in the type of `lower` (rounded up for float).
template <typename TQ, typename TY, typename T, typename CutOf>
inline int64_t rescore_reaching(const T* lower, const T* block_min, int64_t tile, const TQ* q, const TY* train,
                                int64_t y_stride, int64_t dim, int64_t tile_start, const std::vector<int64_t>& done,
                                TopK& top, CutOf cut_of) {
  int64_t rescored = 0;
  T cut = cut_of(top.kth());
  for (int64_t j0 = 0; j0 < tile; j0 += kBoundBlock) {
    if (block_min[j0 / kBoundBlock] > cut) continue;
    const int64_t end = std::min(tile, j0 + kBoundBlock);
    for (int64_t j = j0; j < end; ++j) {
      if (lower[j] > cut) continue;
      if (std::find(done.begin(), done.end(), j) != done.end()) continue;
      top.insert(exact_sqdist(q, train + j * y_stride, dim), tile_start + j);
      ++rescored;
      cut = cut_of(top.kth());
    }
  }
  return rescored;
}

template <typename TQ, typename TY, typename G>
int64_t screen_tile(const TQ* queries, int64_t q_stride, const double* q_norms, int64_t batch, int64_t dim,
                    const TY* train, int64_t y_stride, const double* y_norms, int64_t tile_start, int64_t tile,
                    const G* gram, int64_t k, double* best_d2, int64_t* best_idx, const ScreenBound& bound,
                    int threads) {
  int64_t rescored_total = 0;
  const double assumed = bound.safety * bound.gamma;  // S gamma_D in C_q and C_j
  const RowTerms rows(y_norms, tile, assumed, bound.absolute);
  auto query_c = [&](int64_t b) {  // C_q of the float bounds
    const double* qn = q_norms + kNormColumns * b;
    return bound.absolute + 1.01 * qn[0] + (3.1 + assumed) * qn[1] * qn[1] + 2.1 * qn[2] * qn[2];
  };
  double largest_query_c = 0;
  for (int64_t b = 0; b < batch; ++b) largest_query_c = std::max(largest_query_c, query_c(b));
  // the double bounds' columns, made only if some query needs them
  std::unique_ptr<NormColumns> yn;
  if (!(largest_query_c + rows.largest_c <= kFloatBoundLimit)) yn = std::make_unique<NormColumns>(y_norms, tile);
#pragma omp parallel num_threads(threads) reduction(+ : rescored_total)
  {
    const int64_t blocks = (tile + kBoundBlock - 1) / kBoundBlock;
    std::vector<float> lower(tile), block_min(blocks), smallest;
    std::vector<double> lower_double, block_min_double, smallest_double;
    std::vector<int64_t> chosen, opened;
#pragma omp for schedule(dynamic, 8)
    for (int64_t b = 0; b < batch; ++b) {
      const double* qn = q_norms + kNormColumns * b;
      const double qn2 = qn[0], q_round = qn[1], q_delta = qn[2], q_scale = qn[3];
      TopK top{best_d2 + b * k, best_idx + b * k, k};
      const TQ* q = queries + b * q_stride;
      const G* g_row = gram + b * tile;
      const bool first = !(top.kth() < std::numeric_limits<double>::infinity());
      const double c_q = query_c(b);
      int64_t rescored = 0;
      chosen.clear();
      if (c_q + rows.largest_c <= kFloatBoundLimit) {
        const float a = static_cast<float>(qn2 - bound.absolute * (1.0 + qn2) - kFloatBoundMargin * c_q);
        const float sigma = static_cast<float>(2.0 * q_scale);
        const float beta = static_cast<float>(2.0 * kProvenSlack * (q_round + q_delta));
        const float gamma = static_cast<float>(2.0 * kProvenSlack * q_delta + 2.0 * assumed * q_round);
        const float kappa = static_cast<float>(2.0 * bound.safety * bound.unit * q_scale);
        if (bound.unit > 0)
          float_lower_bounds<true>(rows, g_row, tile, a, sigma, beta, gamma, kappa, lower.data(), block_min.data());
        else
          float_lower_bounds<false>(rows, g_row, tile, a, sigma, beta, gamma, kappa, lower.data(), block_min.data());
        if (first) {
          // no k rows known exactly yet: re-score the k rows of smallest lower bound first, so that
          // the cut is an exact k-th distance from the start
          k_smallest(lower.data(), block_min.data(), tile, k, smallest, opened, chosen);
          for (const int64_t j : chosen) top.insert(exact_sqdist(q, train + j * y_stride, dim), tile_start + j);
          rescored += static_cast<int64_t>(chosen.size());
        }
        rescored += rescore_reaching(lower.data(), block_min.data(), tile, q, train, y_stride, dim, tile_start, chosen, top,
                                     [](double kth) { return float_at_least(kth); });
      } else {
        const QueryBounds<G> qb{qn2, q_round, q_delta, q_scale, yn->col[0], yn->col[1], yn->col[2], yn->col[3],
                                g_row, &bound};
        lower_double.resize(tile);
        block_min_double.resize(blocks);
        double_lower_bounds(qb, tile, lower_double.data(), block_min_double.data());
        if (first) {
          k_smallest(lower_double.data(), block_min_double.data(), tile, k, smallest_double, opened, chosen);
          for (const int64_t j : chosen) top.insert(exact_sqdist(q, train + j * y_stride, dim), tile_start + j);
          rescored += static_cast<int64_t>(chosen.size());
        }
        rescored += rescore_reaching(lower_double.data(), block_min_double.data(), tile, q, train, y_stride, dim, tile_start, chosen, top,
                                     [](double kth) { return kth; });
      }
      rescored_total += rescored;
    }
  }
  return rescored_total;
}

template <typename TQ, typename G>
int64_t screen_tile_dispatch_train(const TQ* queries, int64_t q_stride, const double* q_norms, int64_t batch,
                                   int64_t dim, std::uintptr_t train_ptr, DType train_dtype, int64_t y_stride,
                                   const double* y_norms, int64_t tile_start, int64_t tile, const G* gram,
                                   int64_t k, double* best_d2, int64_t* best_idx, const ScreenBound& bound,
                                   int threads) {
  switch (train_dtype) {
    case DType::float32:
      return screen_tile(queries, q_stride, q_norms, batch, dim, reinterpret_cast<const float*>(train_ptr), y_stride,
                         y_norms, tile_start, tile, gram, k, best_d2, best_idx, bound, threads);
    case DType::float64:
      return screen_tile(queries, q_stride, q_norms, batch, dim, reinterpret_cast<const double*>(train_ptr), y_stride,
                         y_norms, tile_start, tile, gram, k, best_d2, best_idx, bound, threads);
    case DType::uint8:
      return screen_tile(queries, q_stride, q_norms, batch, dim, reinterpret_cast<const uint8_t*>(train_ptr),
                         y_stride, y_norms, tile_start, tile, gram, k, best_d2, best_idx, bound, threads);
    default:
      fail_arg("train", "expected float32, float64 or uint8 data");
  }
}

template <typename G>
int64_t screen_tile_dispatch(std::uintptr_t queries_ptr, DType qtype, int64_t batch, int64_t dim,
                             const double* q_norms, std::uintptr_t train_ptr, DType ytype, int64_t tile_start,
                             int64_t tile, const double* y_norms, const G* gram, int64_t k, double* best_d2,
                             int64_t* best_idx, const ScreenBound& bound, int threads) {
  switch (qtype) {
    case DType::float32:
      return screen_tile_dispatch_train(reinterpret_cast<const float*>(queries_ptr), dim, q_norms, batch, dim,
                                        train_ptr, ytype, dim, y_norms, tile_start, tile, gram, k, best_d2, best_idx,
                                        bound, threads);
    case DType::float64:
      return screen_tile_dispatch_train(reinterpret_cast<const double*>(queries_ptr), dim, q_norms, batch, dim,
                                        train_ptr, ytype, dim, y_norms, tile_start, tile, gram, k, best_d2, best_idx,
                                        bound, threads);
    default:
      fail_arg("queries", "expected float32 or float64 data");
  }
}

int64_t knn_cpu_screen_tile(std::uintptr_t queries_ptr, const std::string& queries_dtype, int64_t batch, int64_t dim,
                            std::uintptr_t q_norms_ptr, std::uintptr_t train_ptr, const std::string& train_dtype,
                            int64_t tile_start, int64_t tile, std::uintptr_t y_norms_ptr, std::uintptr_t gram_ptr,
                            const std::string& gram_dtype, int64_t k, std::uintptr_t best_d2_ptr, std::uintptr_t best_idx_ptr, double safety,
                            int threads) {
  check_ptr(queries_ptr, "queries");
  check_ptr(q_norms_ptr, "q_norms");
  check_ptr(train_ptr, "train");
  check_ptr(y_norms_ptr, "y_norms");
  check_ptr(gram_ptr, "gram");
  check_ptr(best_d2_ptr, "best_d2");
  check_ptr(best_idx_ptr, "best_idx");
  check_positive(batch, "batch");
  check_positive(dim, "dim");
  check_positive(tile, "tile");
  check_positive(k, "k");
  check_arg(tile_start >= 0, "tile_start", "expected a non-negative row offset");
  check_arg(safety >= 1.0, "safety", "expected a safety factor >= 1");
  threads = resolve_threads(threads);
  const double dim_u = static_cast<double>(dim) * std::ldexp(1.0, -24);
  check_arg(dim_u < 0.5, "dim", "too large for the fp32 accumulation bound");
  const DType gtype = parse_dtype(gram_dtype, "gram_dtype");
  check_arg(gtype == DType::bfloat16 || gtype == DType::float32 || gtype == DType::int32, "gram_dtype",
            "expected bfloat16, float32 or int32 (the screening precision), got " + gram_dtype);
  // int8 screen: the int32 Gram entries are exact (|sum| <= dim 127^2 < 2^31), so only the input
  // rounding is bounded; fp32/bf16: the accumulation (and the bf16 output rounding) too.
  check_arg(gtype != DType::int32 || dim <= kInt8MaxDim, "dim",
            "too large for the exact int32 accumulation of the int8 screen (at most " +
                std::to_string(kInt8MaxDim) + ")");
  const double gamma = gtype == DType::int32 ? 0.0 : dim_u / (1.0 - dim_u);
  const double unit = gtype == DType::bfloat16 ? std::ldexp(1.0, -8) : 0.0;
  const ScreenBound bound{gamma, unit, safety, 1e-12};
  const auto* q_norms = reinterpret_cast<const double*>(q_norms_ptr);
  const auto* y_norms = reinterpret_cast<const double*>(y_norms_ptr);
  auto* best_d2 = reinterpret_cast<double*>(best_d2_ptr);
  auto* best_idx = reinterpret_cast<int64_t*>(best_idx_ptr);
  const DType qtype = parse_dtype(queries_dtype, "queries");
  const DType ytype = parse_dtype(train_dtype, "train");
  auto screen = [&](const auto* gram) {
    return screen_tile_dispatch(queries_ptr, qtype, batch, dim, q_norms, train_ptr, ytype, tile_start, tile, y_norms,
                                gram, k, best_d2, best_idx, bound, threads);
  };
  if (gtype == DType::bfloat16) return screen(reinterpret_cast<const uint16_t*>(gram_ptr));
  if (gtype == DType::int32) return screen(reinterpret_cast<const int32_t*>(gram_ptr));
  return screen(reinterpret_cast<const float*>(gram_ptr));
}

// ----------------------------------------------------------------------------------------------
void knn_cuda_entry(std::uintptr_t queries_ptr, std::uintptr_t train_ptr, const std::string& train_dtype,
                    int64_t batch, int64_t n_train, int64_t dim, int64_t k, int64_t tile,
                    std::uintptr_t workspace_ptr, std::uintptr_t best_d2_ptr, std::uintptr_t best_idx_ptr,
                    int device, std::uintptr_t stream) {
  check_ptr(queries_ptr, "queries");
  check_ptr(train_ptr, "train");
  check_ptr(workspace_ptr, "workspace");
  check_ptr(best_d2_ptr, "best_d2");
  check_ptr(best_idx_ptr, "best_idx");
  check_positive(batch, "batch");
  check_positive(n_train, "n_train");
  check_positive(dim, "dim");
  check_positive(k, "k");
  check_positive(tile, "tile");
  check_arg(k <= kKnnCudaMaxK, "k", "the CUDA kernel supports k <= " + std::to_string(kKnnCudaMaxK));
  const DType ytype = parse_dtype(train_dtype, "train");
  check_arg(ytype == DType::float32 || ytype == DType::uint8, "train", "expected float32 or uint8 on CUDA");
#ifdef DIFFCORE_WITH_CUDA
  knn_cuda_launch(reinterpret_cast<const float*>(queries_ptr), reinterpret_cast<const void*>(train_ptr), ytype,
                  batch, n_train, dim, k, tile, reinterpret_cast<float*>(workspace_ptr),
                  reinterpret_cast<double*>(best_d2_ptr), reinterpret_cast<int64_t*>(best_idx_ptr), device,
                  reinterpret_cast<void*>(stream));
#else
  (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: knn_cuda: built without CUDA (DIFFCORE_CUDA=OFF or no nvcc)");
#endif
}

void register_knn(py::module_& m) {
  def_keyword_only(m, "knn_cpu_prepare_rows", &knn_cpu_prepare_rows,
                   keywords("src_ptr", "dtype", "rows", "dim", "row_stride", "dst_ptr", "dst_dtype", "int8_levels",
                            "norms_ptr", "threads", "arg_name"),
                   "Copy [rows, dim] of rows (float32/float64/uint8 -> u/127.5-1) in the screening precision "
                   "dst_dtype (bfloat16, float32, or int8 with a per-row scale and values in [-int8_levels, "
                   "int8_levels]; dst_ptr 0: no copy, float32 rows only) and per-row doubles [|x|^2, |s(x)|, "
                   "|x - s(x)|, scale]; raises ValueError on NaN/Inf.");
  def_keyword_only(m, "knn_cpu_screen_tile", &knn_cpu_screen_tile,
                   keywords("queries_ptr", "queries_dtype", "batch", "dim", "q_norms_ptr", "train_ptr", "train_dtype",
                            "tile_start", "tile", "y_norms_ptr", "gram_ptr", "gram_dtype", "k", "best_d2_ptr",
                            "best_idx_ptr", "safety", "threads"),
                   "Screen one training tile with the bf16, float32 or int32 (int8 screen) Gram tile, re-score "
                   "survivors exactly, merge into the per-query top-k (double d^2 [batch, k], int64 [batch, k]). "
                   "Returns the number re-scored.");
  def_keyword_only(m, "knn_cuda", &knn_cuda_entry,
                   keywords("queries_ptr", "train_ptr", "train_dtype", "batch", "n_train", "dim", "k", "tile",
                            "workspace_ptr", "best_d2_ptr", "best_idx_ptr", "device", "stream"),
                   "CUDA exact k-NN: float32 queries [batch, dim] and float32/uint8 train [n_train, dim] on one GPU; "
                   "workspace float32 [batch, tile]; fills double d^2 and int64 indices [batch, k].");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(knn, diffcore::register_knn);
