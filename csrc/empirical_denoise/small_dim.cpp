// Empirical optimal denoiser for small rows (the digits: N = 1797, D = 64), in one C++ call.
//
// At these sizes the op is latency-bound: the tile path's torch GEMMs, Python between them and the
// OpenMP hand-offs cost more than the arithmetic. Here each block of 4 queries makes one pass over
// the whole training set, which stays in cache. Per query, one of two ways:
//   A. the screen (few pairs carry weight: small sigma, predicted per query by SmallArgs::screen_ratio):
//      |y|^2 - 2 x . y for every pair from an fp32 Gram (8 lanes, twice the float64 rate), first
//      over the quarter of the columns of largest variance, then (if that keeps too many rows)
//      over every column, with a proven bound of its error (screen_query and partial_screen_query
//      below); every pair proven to lie more than `band` logits below the query's largest is
//      dropped, the few survivors are re-scored exactly (difference first, float64: distance.h) and
//      the query is finished from them (weights, weighted mean in float64). More than
//      screen_max_kept survivors in both passes: the query takes way B.
//   B. the dense way:
//   1. G = x . y in float64 (fp32 inputs: every product exact, D - 1 roundings), so that the GEMM
//      error bound k |x| |y| with k = gamma_D (u = 2^-53) is ~1e9 times smaller than fp32's; in
//      float32 (twice the rate) for a block whose proven fp32 bound already keeps every logit within
//      rescore_tol (large sigma: 80 on the digits);
//   2. logits l = -(|x|^2 + |y|^2 - 2 G) / (2 sigma^2), the per-pair error bound e (GEMM error and
//      the float64 rounding of the expression), pairs whose upper bound lies `band` below the lower
//      bound of the max dropped, kept pairs with e > rescore_tol re-scored exactly (difference
//      first, float64: distance.h), as in the tile path (empirical_denoise.cpp);
//   3. weights exp(l - max) (a vectorized float64 exp, relative error < 1e-13) as float32, their
//      sum in float64, and out = sum_j w_j y_j / sum by a 4-query x 16-column register-blocked
//      product (fp32 in registers over groups of 32 rows, float64 across groups; zero-weight rows
//      skipped).
// Each query's way and result depend on its own data only (the float64-or-float32 choice of way B
// on the block's remaining queries), never on the thread count. Queries are split across threads
// only above `parallel_min_work` multiply-adds (measured).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DIFFCORE_SMALL_AVX2 1
#endif

#include "common/checks.h"
#include "common/distance.h"
#include "common/registry.h"

namespace py = pybind11;

namespace diffcore {
namespace {

constexpr int kMaxDim = 256;  // the Python side sends larger rows to the tile path
constexpr int kQueries = 4;  // queries per block (the accumulation kernel is written for 4) (register blocking of both products)
constexpr int kRows = 8;     // training rows per step of the float64 Gram kernel (two vectors of 4 doubles)
constexpr int kScreenRows = 24;  // training rows per step of the screen's fp32 Gram kernel (three vectors of 8)
constexpr int64_t kPadRows = 48;  // the transposed rows are padded to a multiple of every kernel's step

// exp(v) for v <= 0 in float64 without libm: v = n ln2 + r, |r| <= ln2 / 2, exp(r) by its degree-11
// Taylor polynomial (truncation < 2e-16), times 2^n built in the exponent bits; n by the 1.5 * 2^52
// rounding trick. v below -708 gives exp(-708) (~3e-308; such weights are dropped before anyway).
constexpr double kRoundMagic = 6755399441055744.0;  // 1.5 * 2^52
constexpr double kExpCoef[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0,
                                 1.0 / 720.0,      1.0 / 120.0,     1.0 / 24.0,      1.0 / 6.0,     0.5,
                                 1.0,              1.0};

inline double exp_nonpositive(double v) {
  v = std::max(v, -708.0);
  const double shifted = v * 1.4426950408889634 + kRoundMagic;
  const double n = shifted - kRoundMagic;
  const double r = std::fma(-n, 1.9082149292705877e-10, std::fma(-n, 0.6931471803691238, v));
  double p = kExpCoef[0];
  for (int i = 1; i < 12; ++i) p = std::fma(p, r, kExpCoef[i]);
  int64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4338000000000000LL + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#ifdef DIFFCORE_SMALL_AVX2
inline __m256d exp_nonpositive(__m256d v) {
  const __m256d magic = _mm256_set1_pd(kRoundMagic);
  v = _mm256_max_pd(v, _mm256_set1_pd(-708.0));
  const __m256d shifted = _mm256_fmadd_pd(v, _mm256_set1_pd(1.4426950408889634), magic);
  const __m256d n = _mm256_sub_pd(shifted, magic);
  __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(0.6931471803691238), v);
  r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.9082149292705877e-10), r);
  __m256d p = _mm256_set1_pd(kExpCoef[0]);
  for (int i = 1; i < 12; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kExpCoef[i]));
  __m256i bits = _mm256_sub_epi64(_mm256_castpd_si256(shifted), _mm256_set1_epi64x(0x4338000000000000LL - 1023));
  bits = _mm256_slli_epi64(bits, 52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
}
#endif

// The training set as the kernels read it, built once per call.
struct SmallTrain {
  int64_t rows, padded, dim;
  std::vector<float> yt;      // [dim, padded] transposed (Gram kernel), zero-padded rows
  std::vector<float> decoded;  // [rows, dim] float32 of uint8 rows (empty for float32 rows)
  const float* yf;             // [rows, dim] float32 rows for the accumulation: the input or `decoded`
  std::vector<double> yn2;    // [rows] exact squared norms (float64 values, as distance.h)
  std::vector<double> ynorm;  // [rows]
  std::vector<float> yn2f;    // [padded] |y|^2 rounded to float32 (screen); +inf for the padding rows
  double ynorm_max;
  double spread;              // mean |y - mean y|^2 (the screen's predictor, see SmallArgs::screen_ratio)
  std::vector<int32_t> all_dims;    // 0 .. dim - 1
  std::vector<int32_t> top_dims;    // the ceil(dim / 4) columns of largest variance (the partial screen)
  std::vector<float> part_yn2f;     // [padded] sum over top_dims of y^2, rounded to float32; +inf padding
  double max_abs;             // largest |value| (the caller refuses > 1e15)
  const void* y;              // original rows (exact re-scoring)
  DType dtype;
};

// yt[k * padded + j] = yf[j * dim + k]: 8 x 8 tiles transposed in registers, the edges one by one.
void transpose_rows(const float* yf, int64_t rows, int64_t dim, float* yt, int64_t padded) {
  int64_t j0 = 0;
#ifdef DIFFCORE_SMALL_AVX2
  for (; j0 + 8 <= rows; j0 += 8) {
    int64_t k0 = 0;
    for (; k0 + 8 <= dim; k0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(yf + (j0 + i) * dim + k0);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      const __m256 out[8] = {_mm256_permute2f128_ps(u0, u4, 0x20), _mm256_permute2f128_ps(u1, u5, 0x20),
                             _mm256_permute2f128_ps(u2, u6, 0x20), _mm256_permute2f128_ps(u3, u7, 0x20),
                             _mm256_permute2f128_ps(u0, u4, 0x31), _mm256_permute2f128_ps(u1, u5, 0x31),
                             _mm256_permute2f128_ps(u2, u6, 0x31), _mm256_permute2f128_ps(u3, u7, 0x31)};
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(yt + (k0 + i) * padded + j0, out[i]);
    }
    for (; k0 < dim; ++k0)
      for (int64_t j = j0; j < j0 + 8; ++j) yt[k0 * padded + j] = yf[j * dim + k0];
  }
#endif
  for (; j0 < rows; ++j0)
    for (int64_t k = 0; k < dim; ++k) yt[k * padded + j0] = yf[j0 * dim + k];
}

// The uint8 pixel values u / 127.5 - 1 in float64, as value_as_double evaluates them (no division per value).
struct Uint8Values {
  double v[256];
  Uint8Values() {
    for (int u = 0; u < 256; ++u) v[u] = value_as_double(static_cast<uint8_t>(u));
  }
};
const Uint8Values kUint8Values;

// Per row of y (float32 or uint8): the float64 squared norm (any summation order: the bounds hold
// for any), the largest |value| (NaN / Inf: the norm is not finite, so max_abs becomes NaN below),
// the column sums (the spread) and, for uint8 rows, the float32 decoding.
template <typename T>
void prepare_rows(SmallTrain& t, const T* y, double* column_sum, double& sqnorm_sum) {
  const int64_t dim = t.dim;
  for (int64_t j = 0; j < t.rows; ++j) {
    const T* row = y + j * dim;
    float* decoded = std::is_same_v<T, uint8_t> ? t.decoded.data() + j * dim : nullptr;
    double total = 0, largest = 0;
    if constexpr (std::is_same_v<T, uint8_t>) {  // table look-ups (a vector gather was slower)
      for (int64_t k = 0; k < dim; ++k) {
        const double v = kUint8Values.v[row[k]];
        total += v * v;
        largest = std::max(largest, std::fabs(v));
        column_sum[k] += v;
        decoded[k] = static_cast<float>(v);
      }
    } else {
#pragma omp simd reduction(+ : total) reduction(max : largest)
      for (int64_t k = 0; k < dim; ++k) {
        const double v = row[k];
        total += v * v;
        largest = std::max(largest, std::fabs(v));
        column_sum[k] += v;
      }
    }
    t.max_abs = std::isfinite(total) ? std::max(t.max_abs, largest) : std::numeric_limits<double>::quiet_NaN();
    t.yn2[j] = total;
    t.yn2f[j] = static_cast<float>(total);
    t.ynorm[j] = std::sqrt(total);
    t.ynorm_max = std::max(t.ynorm_max, t.ynorm[j]);
    sqnorm_sum += total;
  }
}

SmallTrain prepare_train(const void* y, DType dtype, int64_t rows, int64_t dim) {
  SmallTrain t{rows, (rows + kPadRows - 1) / kPadRows * kPadRows, dim, {}, {}, nullptr, {}, {}, {}, 0.0, 0.0,
               {}, {}, {}, 0.0, y, dtype};
  t.yt.assign(static_cast<size_t>(dim * t.padded), 0.0f);
  if (dtype == DType::uint8) t.decoded.resize(static_cast<size_t>(rows * dim));
  t.yf = dtype == DType::uint8 ? t.decoded.data() : static_cast<const float*>(y);
  t.yn2.resize(rows);
  t.ynorm.resize(rows);
  t.yn2f.assign(static_cast<size_t>(t.padded), std::numeric_limits<float>::infinity());
  std::vector<double> column_sum(static_cast<size_t>(dim), 0.0);
  double sqnorm_sum = 0;
  if (dtype == DType::uint8)
    prepare_rows(t, static_cast<const uint8_t*>(y), column_sum.data(), sqnorm_sum);
  else
    prepare_rows(t, static_cast<const float*>(y), column_sum.data(), sqnorm_sum);
  double mean_sq = 0;
  for (int64_t k = 0; k < dim; ++k) mean_sq += (column_sum[k] / rows) * (column_sum[k] / rows);
  t.spread = std::max(0.0, sqnorm_sum / rows - mean_sq);  // a scale for the predictor only: rounding is harmless
  transpose_rows(t.yf, rows, dim, t.yt.data(), t.padded);
  // The partial screen's columns: those of largest variance (any choice keeps the bound; this one
  // prunes the most), ties by index. Their squared sums per row from the float64 values.
  std::vector<double> mean(static_cast<size_t>(dim)), variance(static_cast<size_t>(dim), 0.0);
  for (int64_t k = 0; k < dim; ++k) mean[k] = column_sum[k] / rows;
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t k = 0; k < dim; ++k) {
      const double v = static_cast<double>(t.yf[j * dim + k]) - mean[k];
      variance[k] += v * v;
    }
  t.all_dims.resize(dim);
  for (int64_t k = 0; k < dim; ++k) t.all_dims[k] = static_cast<int32_t>(k);
  t.top_dims = t.all_dims;
  std::stable_sort(t.top_dims.begin(), t.top_dims.end(), [&](int32_t i, int32_t j) { return variance[i] > variance[j]; });
  t.top_dims.resize((dim + 3) / 4);
  std::sort(t.top_dims.begin(), t.top_dims.end());  // in memory order
  t.part_yn2f.assign(static_cast<size_t>(t.padded), std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < rows; ++j) {
    double total = 0;
    for (const int32_t k : t.top_dims) {
      const double v = dtype == DType::uint8 ? kUint8Values.v[static_cast<const uint8_t*>(y)[j * dim + k]]
                                             : static_cast<double>(static_cast<const float*>(y)[j * dim + k]);
      total += v * v;
    }
    t.part_yn2f[j] = static_cast<float>(total);
  }
  return t;
}

// g[q * padded + j] = x_q . y_j in float64 for the kQueries rows of xb [kQueries, dim] (double).
void gram_block(const SmallTrain& t, const double* xb, double* g) {
  const int64_t dim = t.dim, padded = t.padded;
#ifdef DIFFCORE_SMALL_AVX2
  for (int64_t j = 0; j < padded; j += kRows) {
    __m256d acc[kQueries][2];
    for (auto& a : acc) a[0] = a[1] = _mm256_setzero_pd();
    const float* col = t.yt.data() + j;
    for (int64_t k = 0; k < dim; ++k) {
      const float* yk = col + k * padded;
      const __m256d y0 = _mm256_cvtps_pd(_mm_loadu_ps(yk));
      const __m256d y1 = _mm256_cvtps_pd(_mm_loadu_ps(yk + 4));
      for (int q = 0; q < kQueries; ++q) {
        const __m256d xv = _mm256_broadcast_sd(xb + q * dim + k);
        acc[q][0] = _mm256_fmadd_pd(xv, y0, acc[q][0]);
        acc[q][1] = _mm256_fmadd_pd(xv, y1, acc[q][1]);
      }
    }
    for (int q = 0; q < kQueries; ++q) {
      _mm256_storeu_pd(g + q * padded + j, acc[q][0]);
      _mm256_storeu_pd(g + q * padded + j + 4, acc[q][1]);
    }
  }
#else
  for (int q = 0; q < kQueries; ++q)
    for (int64_t j = 0; j < padded; ++j) {
      double total = 0;
      for (int64_t k = 0; k < dim; ++k) total += xb[q * dim + k] * static_cast<double>(t.yt[k * padded + j]);
      g[q * padded + j] = total;
    }
#endif
}

// As gram_block in float32 (twice the rate; error bound gamma_D with u = 2^-24, used only where that
// bound keeps every logit within rescore_tol: large sigma). Rows in steps of 16 (padded is a multiple).
void gram_block_fp32(const SmallTrain& t, const double* xb, double* g) {
  const int64_t dim = t.dim, padded = t.padded;
#ifdef DIFFCORE_SMALL_AVX2
  float xf[kQueries * kMaxDim];
  for (int64_t i = 0; i < kQueries * dim; ++i) xf[i] = static_cast<float>(xb[i]);  // exact: fp32 inputs
  int64_t j = 0;
  for (; j + 16 <= padded; j += 16) {
    __m256 acc[kQueries][2];
    for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
    const float* col = t.yt.data() + j;
    for (int64_t k = 0; k < dim; ++k) {
      const __m256 y0 = _mm256_loadu_ps(col + k * padded), y1 = _mm256_loadu_ps(col + k * padded + 8);
      for (int q = 0; q < kQueries; ++q) {
        const __m256 xv = _mm256_broadcast_ss(xf + q * dim + k);
        acc[q][0] = _mm256_fmadd_ps(xv, y0, acc[q][0]);
        acc[q][1] = _mm256_fmadd_ps(xv, y1, acc[q][1]);
      }
    }
    for (int q = 0; q < kQueries; ++q)
      for (int h = 0; h < 2; ++h) {
        double* dst = g + q * padded + j + 8 * h;
        _mm256_storeu_pd(dst, _mm256_cvtps_pd(_mm256_castps256_ps128(acc[q][h])));
        _mm256_storeu_pd(dst + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(acc[q][h], 1)));
      }
  }
  for (; j < padded; ++j)
    for (int q = 0; q < kQueries; ++q) {
      float total = 0;
      for (int64_t k = 0; k < dim; ++k) total = std::fma(xf[q * dim + k], t.yt[k * padded + j], total);
      g[q * padded + j] = total;
    }
#else
  gram_block(t, xb, g);
#endif
}

// The screen (few pairs carry weight: small sigma). s[q * padded + j] = fl32(fl32(|y_j|^2) - 2 G~_qj)
// with G~ = x_q . y_j in float32 (fp32 inputs, fp32 accumulation, any order), and smin[q] = min_j
// s[q * padded + j]. The padding rows give +inf (yn2f). The error of s against the exact
// |y_j|^2 - 2 x_q . y_j is bounded in screen_query.
void screen_gram_block(const SmallTrain& t, const std::vector<int32_t>& dims, const float* yn2f, const float* xf,
                       float* s, float* smin) {
  const int64_t dim = t.dim, padded = t.padded, ndims = static_cast<int64_t>(dims.size());
#ifdef DIFFCORE_SMALL_AVX2
  const __m256 two = _mm256_set1_ps(2.0f);
  __m256 vmin[kQueries];
  for (auto& v : vmin) v = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < padded; j += kScreenRows) {  // padded is a multiple of kScreenRows
    __m256 acc[kQueries][3];
    for (auto& a : acc) a[0] = a[1] = a[2] = _mm256_setzero_ps();
    const float* col = t.yt.data() + j;
    for (int64_t kk = 0; kk < ndims; ++kk) {
      const int64_t k = dims[kk];
      const float* yk = col + k * padded;
      const __m256 y0 = _mm256_loadu_ps(yk), y1 = _mm256_loadu_ps(yk + 8), y2 = _mm256_loadu_ps(yk + 16);
      for (int q = 0; q < kQueries; ++q) {
        const __m256 xv = _mm256_broadcast_ss(xf + q * dim + k);
        acc[q][0] = _mm256_fmadd_ps(xv, y0, acc[q][0]);
        acc[q][1] = _mm256_fmadd_ps(xv, y1, acc[q][1]);
        acc[q][2] = _mm256_fmadd_ps(xv, y2, acc[q][2]);
      }
    }
    for (int h = 0; h < 3; ++h) {
      const __m256 n = _mm256_loadu_ps(yn2f + j + 8 * h);
      for (int q = 0; q < kQueries; ++q) {
        const __m256 v = _mm256_fnmadd_ps(two, acc[q][h], n);  // one rounding of |y|^2 - 2 G~
        _mm256_storeu_ps(s + q * padded + j + 8 * h, v);
        vmin[q] = _mm256_min_ps(vmin[q], v);
      }
    }
  }
  for (int q = 0; q < kQueries; ++q) {
    float lanes[8];
    _mm256_storeu_ps(lanes, vmin[q]);
    smin[q] = *std::min_element(lanes, lanes + 8);
  }
#else
  for (int q = 0; q < kQueries; ++q) {
    float smallest = std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < padded; ++j) {
      float total = 0;
      for (const int32_t k : dims) total = std::fma(xf[q * dim + k], t.yt[k * padded + j], total);
      const float v = std::fma(-2.0f, total, yn2f[j]);
      s[q * padded + j] = v;
      smallest = std::min(smallest, v);
    }
    smin[q] = smallest;
  }
#endif
}

// The smallest float >= value (finite or +inf): a cut rounded up never drops a pair the exact cut keeps.
inline float float_at_least(double value) {
  float f = static_cast<float>(value);
  if (static_cast<double>(f) < value) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

struct SmallArgs {
  const float* x;
  const double* inv2s2;
  int64_t batch;
  double gemm_err_coef, fp32_err_coef, rounding_coef, rescore_tol, band;
  float* out;
  double* logz;
  uint8_t* redo;             // [B] 1 where the logits need more than float64 sums (see below)
  double redo_coef;          // 2 f (f = rounding_coef): rows with redo_coef (|logz| + log N + band) > tiny_tol
  double tiny_tol;
  // The screen (screen_query) is tried for a query whose fp32 bound is too loose to keep its logits
  // (small and mid sigma) and whose band, in squared distance, 2 sigma^2 band, is at most
  // screen_ratio times the training set's spread (mean |y - mean y|^2): a prediction that few pairs
  // lie within the band of the nearest (chosen by measurement; 0: never screen). A screened query
  // with more than screen_max_kept survivors takes the float64 Gram path after all.
  double screen_ratio;
  int64_t screen_max_kept;
};

// Per-thread scratch of the blocks.
struct BlockScratch {
  std::vector<double> xb, g, logit, acc, dist;
  std::vector<float> xf, w, s;
  std::vector<int32_t> active, kept;
  int64_t screened = 0, kept_total = 0, partial = 0;  // queries finished by the screen, their survivors, by pass 1
  BlockScratch(const SmallTrain& t)
      : xb(kQueries * t.dim), g(kQueries * t.padded), logit(t.padded), acc(kQueries * t.dim), dist(t.rows),
        xf(kQueries * t.dim), w(kQueries * t.padded), s(kQueries * t.padded) {
    active.reserve(t.rows);
    kept.reserve(t.rows);
  }
};

// The screen: drop every pair that an fp32 Gram proves to lie more than `band` logits below the
// query's largest, re-score the survivors exactly (difference first, float64), and finish the
// query from them (weights, out, logz, redo). Two passes, each returns false (nothing written) when
// more than screen_max_kept pairs survive or none does (NaN), and the query goes on to the next:
//   1. partial_screen_query: the Gram over the ceil(D / 4) columns of largest variance (a quarter
//      of the work) bounds each squared distance from below by its part over those columns; the
//      row with the smallest such part is re-scored exactly, an upper bound of the smallest distance;
//   2. screen_query: the Gram over every column, the smallest |y|^2 - 2 x.y as the reference;
//   then the float64 Gram (run_block).
//
// The bound. For a set S of columns (all of them in pass 2) let d_j = |x - y_j|^2 (exact),
// p_j = |x_S - y_jS|^2 <= d_j its part over S, s_j = n_j - 2 G~_j with n_j the float64 sum of y_jk^2
// over S and G~_j the fp32 Gram entry over S, and s~_j the float value screen_gram_block stores. Then
//   |xn_S + s_j - p_j| <= f (|x| + |y_j|)^2 + 2 k32 |x| |y_j|
// (float64 sums of squares: gamma_{D+4}, u = 2^-53, rounding_coef f; fp32 Gram of fp32 inputs in any
// order, one rounding more for uint8 rows decoded to fp32: k32 = gamma_{D+1}, u = 2^-24; over S,
// |x_S| <= |x| and fewer terms), and
//   |s~_j - s_j| <= 2^-24 n_j + 2^-24 |fl(n_j) - 2 G~_j| <= 2^-23 * 1.01 (|y_j|^2 + |x| |y_j|) + 2^-140
// (fl(n) rounded once, the fused n - 2 G~ once; |G~| <= (1 + k32) |x| |y|; 2^-140 covers float
// underflow). T, the sum of both with |y_j| <= max_j |y_j| (screen_error), bounds |xn_S + s~_j - p_j|
// for every j. Pass 1: with U >= d_min (the exact distance of one row, rounded up), a pair with
// xn_S + s~_j - T > U + 2 sigma^2 band has d_j >= p_j > d_min + 2 sigma^2 band. Pass 2 (p = d): a
// pair with s~_j > min_i s~_i + 2 sigma^2 band + 2 T has d_j > d_min + 2 sigma^2 band. Either way
// its logit l_j < l_max - band: it weighs less than e^-band of the largest and is dropped, as the
// tile path drops it. Cuts are rounded up to float, so a float comparison never drops more.
double screen_error(const SmallArgs& a, double xnorm, double ymax) {
  const double reach = xnorm + ymax;
  return 2.0 * a.fp32_err_coef * xnorm * ymax + a.rounding_coef * reach * reach +
         0x1p-23 * 1.01 * (ymax * ymax + xnorm * ymax) + 0x1p-140;
}

// kept = the rows j with srow[j] <= cut (double, rounded up to float here); false if more than
// limit or none (a NaN cut keeps none).
bool select_rows(const SmallTrain& t, const float* srow, double cut, int64_t limit, std::vector<int32_t>& kept) {
  kept.clear();
  if (!(cut < std::numeric_limits<double>::infinity())) return false;  // NaN (NaN train) or overflow
  const float cutf = float_at_least(cut);
  int64_t j = 0;
#ifdef DIFFCORE_SMALL_AVX2
  const __m256 vcut = _mm256_set1_ps(cutf);
  for (; j + 8 <= t.padded; j += 8) {
    unsigned mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(srow + j), vcut, _CMP_LE_OQ)));
    while (mask != 0) {
      const int64_t row = j + __builtin_ctz(mask);
      mask &= mask - 1;
      if (row >= t.rows) continue;
      if (static_cast<int64_t>(kept.size()) >= limit) return false;
      kept.push_back(static_cast<int32_t>(row));
    }
  }
#endif
  for (; j < t.rows; ++j)
    if (srow[j] <= cutf) {
      if (static_cast<int64_t>(kept.size()) >= limit) return false;
      kept.push_back(static_cast<int32_t>(j));
    }
  return !kept.empty();
}

inline double row_sqdist(const SmallTrain& t, const float* xrow, int64_t j) {
  return t.dtype == DType::float32 ? exact_sqdist(xrow, static_cast<const float*>(t.y) + j * t.dim, t.dim)
                                   : exact_sqdist(xrow, static_cast<const uint8_t*>(t.y) + j * t.dim, t.dim);
}

// Finish query b from its survivors scratch.kept: exact logits, relative weights, the weighted mean
// in float64, logz and the redo flag.
void finish_screened(const SmallTrain& t, const SmallArgs& a, int64_t b, BlockScratch& scratch) {
  const std::vector<int32_t>& kept = scratch.kept;
  const int64_t dim = t.dim;
  const double c = a.inv2s2[b];
  const float* xrow = a.x + b * dim;
  double* dist = scratch.dist.data();
  double mx = -std::numeric_limits<double>::infinity();
  for (size_t i = 0; i < kept.size(); ++i) {
    dist[i] = row_sqdist(t, xrow, kept[i]);
    mx = std::max(mx, -dist[i] * c);
  }
  double* acc = scratch.acc.data();  // the first dim values (the dense path's block accumulator is not in use)
  std::fill(acc, acc + dim, 0.0);
  double sum = 0;
  for (size_t i = 0; i < kept.size(); ++i) {
    const double w = exp_nonpositive(-dist[i] * c - mx);
    sum += w;
    if (t.dtype == DType::float32) {
      const float* yf = static_cast<const float*>(t.y) + kept[i] * dim;
      for (int64_t k = 0; k < dim; ++k) acc[k] += w * yf[k];
    } else {
      const uint8_t* yu = static_cast<const uint8_t*>(t.y) + kept[i] * dim;
      for (int64_t k = 0; k < dim; ++k) acc[k] += w * kUint8Values.v[yu[k]];
    }
  }
  float* orow = a.out + b * dim;
  for (int64_t k = 0; k < dim; ++k) orow[k] = static_cast<float>(acc[k] / sum);
  const double logz = mx + std::log(sum);
  a.logz[b] = logz;
  a.redo[b] = !(a.redo_coef * (std::fabs(logz) + std::log(static_cast<double>(t.rows)) + a.band) <= a.tiny_tol);
  scratch.screened += 1;
  scratch.kept_total += static_cast<int64_t>(kept.size());
}

// Pass 1 (see above): srow from the Gram over t.top_dims, xn_part = sum over them of x_k^2 (float64).
bool partial_screen_query(const SmallTrain& t, const SmallArgs& a, int64_t b, const float* srow, float smin,
                          double xnorm, double xn_part, BlockScratch& scratch) {
  int64_t best = 0;  // the first row holding the smallest value (a search, not a serial min chain)
#ifdef DIFFCORE_SMALL_AVX2
  const __m256 vmin = _mm256_set1_ps(smin);
  while (best + 8 <= t.rows &&
         _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(srow + best), vmin, _CMP_EQ_OQ)) == 0)
    best += 8;
#endif
  while (best < t.rows && !(srow[best] == smin)) ++best;
  if (best >= t.rows) return false;  // NaN
  const double d = row_sqdist(t, a.x + b * t.dim, best);
  const double upper = d + 3.0 * a.rounding_coef * d + 1e-300;  // >= the exact distance of row best >= d_min
  const double band_sq = a.band / a.inv2s2[b] * (1.0 + 1e-12);  // the band in squared distance, 2 sigma^2 band
  const double err = screen_error(a, xnorm, t.ynorm_max);
  // (1e-15 of the magnitudes: the float64 roundings of this sum, so that cut >= its exact value)
  const double cut = upper + band_sq + err - xn_part + 1e-15 * (upper + band_sq + err + xn_part);
  if (!select_rows(t, srow, cut, a.screen_max_kept, scratch.kept)) return false;
  finish_screened(t, a, b, scratch);
  scratch.partial += 1;
  return true;
}

// Pass 2 (see above): srow from the Gram over every column, smin its smallest value.
bool screen_query(const SmallTrain& t, const SmallArgs& a, int64_t b, const float* srow, float smin, double xnorm,
                  BlockScratch& scratch) {
  const double band_sq = a.band / a.inv2s2[b] * (1.0 + 1e-12);
  const double err2 = 2.0 * screen_error(a, xnorm, t.ynorm_max);
  const double low = static_cast<double>(smin);
  const double cut = low + band_sq + err2 + 1e-15 * (std::fabs(low) + band_sq + err2);
  if (!select_rows(t, srow, cut, a.screen_max_kept, scratch.kept)) return false;
  finish_screened(t, a, b, scratch);
  return true;
}

// One query: Gram row -> float32 weights w (0 for dropped pairs); returns (max logit, sum of w).
std::pair<double, double> query_weights(const SmallTrain& t, const SmallArgs& a, int64_t b, const double* grow,
                                        double gemm_err_coef, double* logit, float* w) {
  const int64_t rows = t.rows;
  const float* xrow = a.x + b * t.dim;
  double xn = 0;
  for (int64_t k = 0; k < t.dim; ++k) xn += static_cast<double>(xrow[k]) * xrow[k];
  const double xnorm = std::sqrt(xn), c = a.inv2s2[b];
  const double err_per_ynorm = 2.0 * gemm_err_coef * xnorm * c;
  const double neg_inf = -std::numeric_limits<double>::infinity();
  double lower = neg_inf, worst = 0, mx = neg_inf;
  const double* yn2 = t.yn2.data();
  const double* ynorm = t.ynorm.data();
  const double rounding_c = a.rounding_coef * c;
  int64_t j0 = 0;
#ifdef DIFFCORE_SMALL_AVX2
  {
    __m256d vlower = _mm256_set1_pd(neg_inf), vworst = _mm256_setzero_pd(), vmax = _mm256_set1_pd(neg_inf);
    const __m256d vxn = _mm256_set1_pd(xn), vxnorm = _mm256_set1_pd(xnorm), vc = _mm256_set1_pd(c);
    const __m256d verr = _mm256_set1_pd(err_per_ynorm), vround = _mm256_set1_pd(rounding_c);
    const __m256d two = _mm256_set1_pd(2.0);
    for (; j0 + 4 <= rows; j0 += 4) {
      const __m256d yn = _mm256_loadu_pd(ynorm + j0);
      // l = (2 G - |x|^2 - |y|^2) c, e = err |y| + rounding (|x| + |y|)^2
      const __m256d l = _mm256_mul_pd(_mm256_sub_pd(_mm256_fmsub_pd(two, _mm256_loadu_pd(grow + j0), vxn),
                                                    _mm256_loadu_pd(yn2 + j0)), vc);
      const __m256d r = _mm256_add_pd(vxnorm, yn);
      const __m256d e = _mm256_fmadd_pd(verr, yn, _mm256_mul_pd(vround, _mm256_mul_pd(r, r)));
      _mm256_storeu_pd(logit + j0, l);
      vlower = _mm256_max_pd(vlower, _mm256_sub_pd(l, e));
      vworst = _mm256_max_pd(vworst, e);
      vmax = _mm256_max_pd(vmax, l);
    }
    double lanes[3][4];
    _mm256_storeu_pd(lanes[0], vlower), _mm256_storeu_pd(lanes[1], vworst), _mm256_storeu_pd(lanes[2], vmax);
    for (int i = 0; i < 4; ++i)
      lower = std::max(lower, lanes[0][i]), worst = std::max(worst, lanes[1][i]), mx = std::max(mx, lanes[2][i]);
  }
#endif
  for (int64_t j = j0; j < rows; ++j) {
    const double l = (2.0 * grow[j] - xn - yn2[j]) * c;
    const double r = xnorm + ynorm[j];
    const double e = err_per_ynorm * ynorm[j] + rounding_c * r * r;
    logit[j] = l;
    lower = std::max(lower, l - e);
    worst = std::max(worst, e);
    mx = std::max(mx, l);
  }
  // Pairs whose upper bound l + e lies `band` below `lower` are dropped. Without re-scoring (every
  // e <= worst) the weights loop below zeroes every pair more than band + 2 worst + 1 below the max,
  // which covers them (max <= lower + worst).
  if (worst > a.rescore_tol) {  // small sigma: re-score exactly the kept pairs whose bound is too loose
    const int64_t row_bytes = t.dim * (t.dtype == DType::uint8 ? 1 : 4);
    mx = neg_inf;
    for (int64_t j = 0; j < rows; ++j) {
      const double e = err_per_ynorm * ynorm[j] + rounding_c * (xnorm + ynorm[j]) * (xnorm + ynorm[j]);
      if (logit[j] + e < lower - a.band) {
        logit[j] = neg_inf;
      } else if (e > a.rescore_tol) {
        const char* yrow = static_cast<const char*>(t.y) + j * row_bytes;
        const double d = t.dtype == DType::float32
                             ? exact_sqdist(xrow, reinterpret_cast<const float*>(yrow), t.dim)
                             : exact_sqdist(xrow, reinterpret_cast<const uint8_t*>(yrow), t.dim);
        logit[j] = -d * c;
      }
      mx = std::max(mx, logit[j]);
    }
  }
  // weights of pairs more than `floor` below the max are 0 (they were dropped, or weigh < e^-61)
  const double floor = -a.band - 2.0 * worst - 1.0;
  double sum = 0;
  int64_t j = 0;
#ifdef DIFFCORE_SMALL_AVX2
  __m256d total = _mm256_setzero_pd();
  const __m256d mxv = _mm256_set1_pd(mx), floorv = _mm256_set1_pd(floor);
  for (; j + 4 <= rows; j += 4) {
    const __m256d v = _mm256_sub_pd(_mm256_loadu_pd(logit + j), mxv);
    const __m256d keep = _mm256_cmp_pd(v, floorv, _CMP_GE_OQ);
    const __m128 p = _mm256_cvtpd_ps(_mm256_and_pd(exp_nonpositive(v), keep));
    _mm_storeu_ps(w + j, p);
    total = _mm256_add_pd(total, _mm256_cvtps_pd(p));
  }
  double lanes[4];
  _mm256_storeu_pd(lanes, total);
  sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; j < rows; ++j) {
    const double v = logit[j] - mx;
    const float p = v >= floor ? static_cast<float>(exp_nonpositive(v)) : 0.0f;
    w[j] = p;
    sum += static_cast<double>(p);
  }
  return {mx, sum};
}

// Active rows summed in fp32 registers per group of this many, then added to float64 accumulators:
// the fp32 rounding error grows with the group, not with N (2.6e-6 relative at sigma 1 on the
// digits with one fp32 sum over all 1797 rows; 1e-7 with groups of 32).
constexpr size_t kGroupRows = 32;

// out rows of a block: acc[q] = sum_j w[q, j] y_j, rows with all-zero weights skipped.
void accumulate_block(const SmallTrain& t, const float* w, int nq, double* acc, std::vector<int32_t>& active) {
  const int64_t dim = t.dim, padded = t.padded;
  std::fill(acc, acc + kQueries * dim, 0.0);
  active.clear();
  for (int64_t j = 0; j < t.rows; ++j) {
    bool any = false;
    for (int q = 0; q < nq; ++q) any |= w[q * padded + j] != 0.0f;
    if (any) active.push_back(static_cast<int32_t>(j));
  }
  int64_t k0 = 0;
#ifdef DIFFCORE_SMALL_AVX2
  const float* w0 = w;
  const float* w1 = w + padded;
  const float* w2 = w + 2 * padded;
  const float* w3 = w + 3 * padded;
  const int32_t* rows = active.data();
  const size_t count = active.size();
  for (; k0 + 16 <= dim; k0 += 16) {
    const float* ybase = t.yf + k0;
    for (size_t g0 = 0; g0 < count; g0 += kGroupRows) {
      const size_t g1 = std::min(count, g0 + kGroupRows);
      __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
      for (size_t i = g0; i < g1; ++i) {
        const int64_t j = rows[i];
        const float* yrow = ybase + j * dim;
        const __m256 y0 = _mm256_loadu_ps(yrow), y1 = _mm256_loadu_ps(yrow + 8);
        __m256 wv = _mm256_broadcast_ss(w0 + j);
        a00 = _mm256_fmadd_ps(wv, y0, a00), a01 = _mm256_fmadd_ps(wv, y1, a01);
        wv = _mm256_broadcast_ss(w1 + j);
        a10 = _mm256_fmadd_ps(wv, y0, a10), a11 = _mm256_fmadd_ps(wv, y1, a11);
        wv = _mm256_broadcast_ss(w2 + j);
        a20 = _mm256_fmadd_ps(wv, y0, a20), a21 = _mm256_fmadd_ps(wv, y1, a21);
        wv = _mm256_broadcast_ss(w3 + j);
        a30 = _mm256_fmadd_ps(wv, y0, a30), a31 = _mm256_fmadd_ps(wv, y1, a31);
      }
      const __m256 sums[kQueries][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
      for (int q = 0; q < kQueries; ++q)
        for (int h = 0; h < 2; ++h) {
          double* dst = acc + q * dim + k0 + 8 * h;
          const __m256 v = sums[q][h];
          _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
          _mm256_storeu_pd(dst + 4,
                           _mm256_add_pd(_mm256_loadu_pd(dst + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
        }
    }
  }
#endif
  for (const int32_t j : active)
    for (int q = 0; q < nq; ++q) {
      const double wq = w[q * padded + j];
      for (int64_t k = k0; k < dim; ++k) acc[q * dim + k] += wq * t.yf[j * dim + k];
    }
}

void run_block(const SmallTrain& t, const SmallArgs& a, int64_t b0, BlockScratch& scratch) {
  const int64_t dim = t.dim, padded = t.padded;
  const int nq = static_cast<int>(std::min<int64_t>(kQueries, a.batch - b0));
  std::vector<double>& xb = scratch.xb;
  for (int q = 0; q < kQueries; ++q) {  // a short last block repeats its last query (results unused)
    const float* xrow = a.x + (b0 + std::min(q, nq - 1)) * dim;
    for (int64_t k = 0; k < dim; ++k) xb[q * dim + k] = xrow[k];
  }
  // Per query: whether the proven fp32 bound keeps every logit within rescore_tol (large sigma),
  // else whether the screen is predicted to leave few pairs (SmallArgs::screen_ratio).
  double xnorm[kQueries];
  bool fp32_holds[kQueries], done[kQueries], second[kQueries] = {}, any_screen = false;
  for (int q = 0; q < nq; ++q) {
    const int64_t b = b0 + q;
    double xn = 0;
    for (int64_t k = 0; k < dim; ++k) xn += xb[q * dim + k] * xb[q * dim + k];
    xnorm[q] = std::sqrt(xn);
    const double reach = xnorm[q] + t.ynorm_max;
    fp32_holds[q] =
        (2.0 * a.fp32_err_coef * xnorm[q] * t.ynorm_max + a.rounding_coef * reach * reach) * a.inv2s2[b] <= a.rescore_tol;
    done[q] = false;
    if (!fp32_holds[q] && a.band / a.inv2s2[b] <= a.screen_ratio * t.spread) any_screen = done[q] = true;
  }
  if (any_screen) {  // screen the block in fp32 over a quarter of the columns, then over all if needed
    float* xf = scratch.xf.data();
    for (int64_t i = 0; i < kQueries * dim; ++i) xf[i] = static_cast<float>(xb[i]);  // exact: fp32 inputs
    float smin[kQueries];
    screen_gram_block(t, t.top_dims, t.part_yn2f.data(), xf, scratch.s.data(), smin);
    bool any_left = false;
    for (int q = 0; q < nq; ++q)
      if (done[q]) {
        double xn_part = 0;
        for (const int32_t k : t.top_dims) xn_part += xb[q * dim + k] * xb[q * dim + k];
        done[q] = partial_screen_query(t, a, b0 + q, scratch.s.data() + q * padded, smin[q], xnorm[q], xn_part,
                                       scratch);
        second[q] = !done[q];
        any_left |= second[q];
      }
    if (any_left) {
      screen_gram_block(t, t.all_dims, t.yn2f.data(), xf, scratch.s.data(), smin);
      for (int q = 0; q < nq; ++q)
        if (second[q]) done[q] = screen_query(t, a, b0 + q, scratch.s.data() + q * padded, smin[q], xnorm[q], scratch);
    }
  }
  // The other queries: Gram of the block in float32 where its bound holds for every one of them, else float64.
  bool fp32 = true, all_done = true;
  for (int q = 0; q < nq; ++q)
    if (!done[q]) fp32 = fp32 && fp32_holds[q], all_done = false;
  if (all_done) return;
  if (fp32)
    gram_block_fp32(t, xb.data(), scratch.g.data());
  else
    gram_block(t, xb.data(), scratch.g.data());
  std::fill(scratch.w.begin(), scratch.w.end(), 0.0f);  // the rows of finished queries stay 0
  double mx[kQueries], sum[kQueries];
  for (int q = 0; q < nq; ++q)
    if (!done[q])
      std::tie(mx[q], sum[q]) =
          query_weights(t, a, b0 + q, scratch.g.data() + q * padded, fp32 ? a.fp32_err_coef : a.gemm_err_coef,
                        scratch.logit.data(), scratch.w.data() + q * padded);
  accumulate_block(t, scratch.w.data(), nq, scratch.acc.data(), scratch.active);
  for (int q = 0; q < nq; ++q) {
    if (done[q]) continue;
    float* orow = a.out + (b0 + q) * dim;
    for (int64_t k = 0; k < dim; ++k) orow[k] = static_cast<float>(scratch.acc[q * dim + k] / sum[q]);
    const double logz = mx[q] + std::log(sum[q]);
    a.logz[b0 + q] = logz;
    // as needs_relative_logits (Python): NaN / inf logz is flagged too
    a.redo[b0 + q] = !(a.redo_coef * (std::fabs(logz) + std::log(static_cast<double>(t.rows)) + a.band) <= a.tiny_tol);
  }
}

// x [B, D] float32, train [N, D] float32 or uint8 (u / 127.5 - 1), inv2s2 [B] -> out [B, D]
// float32, logz [B] float64, redo [B] uint8 (rows whose float64 distance sums could move a logit
// difference by more than tiny_tol: the caller recomputes them with relative logits). Returns
// (largest |train value|, number of rows flagged). gemm_err_coef: k of the float64 Gram (gamma_D, plus 2^-24 for uint8
// rows, which the Gram reads rounded to float32); rounding_coef: as the tile path's.
std::tuple<double, int64_t, int64_t, int64_t, int64_t> small_dim_forward(
    std::uintptr_t x_ptr, std::uintptr_t y_ptr, const std::string& y_dtype, int64_t batch, int64_t rows, int64_t dim,
    std::uintptr_t inv2s2_ptr, double gemm_err_coef, double fp32_err_coef, double rounding_coef, double rescore_tol,
    double band, double tiny_tol, double screen_ratio, int64_t screen_max_kept, std::uintptr_t out_ptr,
    std::uintptr_t logz_ptr, std::uintptr_t redo_ptr, int64_t parallel_min_work, int threads) {
  for (auto [p, name] : {std::pair{x_ptr, "x"}, {y_ptr, "train"}, {inv2s2_ptr, "inv_two_sigma_sq"},
                         {out_ptr, "out"}, {logz_ptr, "logz"}, {redo_ptr, "redo"}})
    check_ptr(p, name);
  check_positive(batch, "batch");
  check_positive(rows, "rows");
  check_positive(dim, "dim");
  check_arg(rows < (int64_t{1} << 31), "rows", "expected fewer than 2^31 training rows");
  check_arg(dim <= kMaxDim, "dim", "expected at most " + std::to_string(kMaxDim) + " values per row");
  const DType dtype = parse_dtype(y_dtype, "train_dtype");
  check_arg(dtype == DType::float32 || dtype == DType::uint8, "train_dtype", "expected float32 or uint8, got " + y_dtype);
  check_arg(gemm_err_coef >= 0 && fp32_err_coef >= 0 && rounding_coef >= 0 && rescore_tol >= 0 && band > 0,
            "gemm_err_coef/rounding_coef/rescore_tol/band", "expected non-negative bounds and band > 0");
  check_arg(screen_ratio >= 0 && screen_max_kept >= 1, "screen_ratio/screen_max_kept",
            "expected screen_ratio >= 0 and screen_max_kept >= 1");
  const SmallTrain t = prepare_train(reinterpret_cast<const void*>(y_ptr), dtype, rows, dim);
  const SmallArgs a{reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const double*>(inv2s2_ptr), batch,
                    gemm_err_coef, fp32_err_coef, rounding_coef, rescore_tol, band, reinterpret_cast<float*>(out_ptr),
                    reinterpret_cast<double*>(logz_ptr), reinterpret_cast<uint8_t*>(redo_ptr),
                    2.0 * rounding_coef, tiny_tol, screen_ratio, screen_max_kept};
  const int64_t blocks = (batch + kQueries - 1) / kQueries;
  const int nthreads = batch * rows * dim >= parallel_min_work ? resolve_threads(threads) : 1;
  (void)nthreads;
  int64_t screened = 0, kept = 0, partial = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1) reduction(+ : screened, kept, partial)
  {
    BlockScratch scratch(t);
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) run_block(t, a, block * kQueries, scratch);
    screened += scratch.screened;
    kept += scratch.kept_total;
    partial += scratch.partial;
  }
  int64_t flagged = 0;
  for (int64_t b = 0; b < batch; ++b) flagged += a.redo[b];
  return {t.max_abs, flagged, screened, kept, partial};
}

void register_small_dim(py::module_& m) {
  def_keyword_only(m, "empirical_denoise_small_dim", &small_dim_forward,
                   keywords("x_ptr", "y_ptr", "y_dtype", "batch", "rows", "dim", "inv2s2_ptr", "gemm_err_coef",
                            "fp32_err_coef", "rounding_coef", "rescore_tol", "band", "tiny_tol", "screen_ratio",
                            "screen_max_kept", "out_ptr", "logz_ptr", "redo_ptr", "parallel_min_work", "threads"),
                   "Empirical denoiser for small rows in one call: an fp32 screen with exact re-scoring of the "
                   "survivors where few pairs carry weight, else float64 Gram, bounded logits (exact re-scoring "
                   "where the bound is loose), weights and the weighted sum; query blocks of 4 over the whole set. "
                   "Returns (largest |train value|, rows flagged for relative logits, queries screened, their "
                   "survivors, queries finished by the first (partial) screen).");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(empirical_denoise_small_dim, diffcore::register_small_dim);
