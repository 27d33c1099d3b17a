// Empirical optimal denoiser for small rows (the digits: N = 1797, D = 64), in one C++ call.
//
// At these sizes the op is latency-bound: the tile path's torch GEMMs, Python between them and the
// OpenMP hand-offs cost more than the arithmetic. Here each block of 4 queries makes one pass over
// the whole training set, which stays in cache:
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
// Queries are split across threads only above `parallel_min_work` multiply-adds (measured).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
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
  double ynorm_max;
  double max_abs;             // largest |value| (the caller refuses > 1e15)
  const void* y;              // original rows (exact re-scoring)
  DType dtype;
};

SmallTrain prepare_train(const void* y, DType dtype, int64_t rows, int64_t dim) {
  SmallTrain t{rows, (rows + 15) / 16 * 16, dim, {}, {}, nullptr, {}, {}, 0.0, 0.0, y, dtype};
  t.yt.assign(static_cast<size_t>(dim * t.padded), 0.0f);
  if (dtype == DType::uint8) t.decoded.resize(static_cast<size_t>(rows * dim));
  t.yf = dtype == DType::uint8 ? t.decoded.data() : static_cast<const float*>(y);
  t.yn2.resize(rows);
  t.ynorm.resize(rows);
  for (int64_t j = 0; j < rows; ++j) {
    double total = 0;
    for (int64_t k = 0; k < dim; ++k) {
      const double v = dtype == DType::float32 ? static_cast<const float*>(y)[j * dim + k]
                                               : value_as_double(static_cast<const uint8_t*>(y)[j * dim + k]);
      total += v * v;
      if (std::fabs(v) > t.max_abs) t.max_abs = std::fabs(v);  // stays NaN once NaN
      if (dtype == DType::uint8) t.decoded[j * dim + k] = static_cast<float>(v);
    }
    if (!std::isfinite(total)) t.max_abs = std::numeric_limits<double>::quiet_NaN();  // NaN / Inf: refused
    t.yn2[j] = total;
    t.ynorm[j] = std::sqrt(total);
    t.ynorm_max = std::max(t.ynorm_max, t.ynorm[j]);
  }
  for (int64_t j0 = 0; j0 < rows; j0 += 16)  // transposed in blocks of 16 rows (one cache line)
    for (int64_t k = 0; k < dim; ++k)
      for (int64_t j = j0; j < std::min(rows, j0 + 16); ++j) t.yt[k * t.padded + j] = t.yf[j * dim + k];
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
};

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

void run_block(const SmallTrain& t, const SmallArgs& a, int64_t b0, std::vector<double>& xb, std::vector<double>& g,
               std::vector<double>& logit, std::vector<float>& w, std::vector<double>& acc,
               std::vector<int32_t>& active) {
  const int64_t dim = t.dim, padded = t.padded;
  const int nq = static_cast<int>(std::min<int64_t>(kQueries, a.batch - b0));
  for (int q = 0; q < kQueries; ++q) {  // a short last block repeats its last query (results unused)
    const float* xrow = a.x + (b0 + std::min(q, nq - 1)) * dim;
    for (int64_t k = 0; k < dim; ++k) xb[q * dim + k] = xrow[k];
  }
  // float32 Gram where its bound keeps every logit of the block within rescore_tol (large sigma)
  bool fp32 = true;
  for (int q = 0; q < nq && fp32; ++q) {
    const int64_t b = b0 + q;
    double xn = 0;
    for (int64_t k = 0; k < dim; ++k) xn += xb[q * dim + k] * xb[q * dim + k];
    const double xnorm = std::sqrt(xn), reach = xnorm + t.ynorm_max;
    fp32 = (2.0 * a.fp32_err_coef * xnorm * t.ynorm_max + a.rounding_coef * reach * reach) * a.inv2s2[b] <= a.rescore_tol;
  }
  if (fp32)
    gram_block_fp32(t, xb.data(), g.data());
  else
    gram_block(t, xb.data(), g.data());
  std::fill(w.begin(), w.end(), 0.0f);
  double mx[kQueries], sum[kQueries];
  for (int q = 0; q < nq; ++q)
    std::tie(mx[q], sum[q]) = query_weights(t, a, b0 + q, g.data() + q * padded, fp32 ? a.fp32_err_coef : a.gemm_err_coef,
                                            logit.data(), w.data() + q * padded);
  accumulate_block(t, w.data(), nq, acc.data(), active);
  for (int q = 0; q < nq; ++q) {
    float* orow = a.out + (b0 + q) * dim;
    for (int64_t k = 0; k < dim; ++k) orow[k] = static_cast<float>(acc[q * dim + k] / sum[q]);
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
std::pair<double, int64_t> small_dim_forward(std::uintptr_t x_ptr, std::uintptr_t y_ptr, const std::string& y_dtype, int64_t batch,
                       int64_t rows, int64_t dim, std::uintptr_t inv2s2_ptr, double gemm_err_coef,
                       double fp32_err_coef, double rounding_coef, double rescore_tol, double band, double tiny_tol,
                       std::uintptr_t out_ptr, std::uintptr_t logz_ptr, std::uintptr_t redo_ptr,
                       int64_t parallel_min_work, int threads) {
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
  const SmallTrain t = prepare_train(reinterpret_cast<const void*>(y_ptr), dtype, rows, dim);
  const SmallArgs a{reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const double*>(inv2s2_ptr), batch,
                    gemm_err_coef, fp32_err_coef, rounding_coef, rescore_tol, band, reinterpret_cast<float*>(out_ptr),
                    reinterpret_cast<double*>(logz_ptr), reinterpret_cast<uint8_t*>(redo_ptr),
                    2.0 * rounding_coef, tiny_tol};
  const int64_t blocks = (batch + kQueries - 1) / kQueries;
  const int nthreads = batch * rows * dim >= parallel_min_work ? resolve_threads(threads) : 1;
  (void)nthreads;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    std::vector<double> xb(kQueries * dim), g(kQueries * t.padded), logit(t.padded);
    std::vector<float> w(kQueries * t.padded);
    std::vector<double> acc(kQueries * dim);
    std::vector<int32_t> active;
    active.reserve(t.rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t block = 0; block < blocks; ++block) run_block(t, a, block * kQueries, xb, g, logit, w, acc, active);
  }
  int64_t flagged = 0;
  for (int64_t b = 0; b < batch; ++b) flagged += a.redo[b];
  return {t.max_abs, flagged};
}

void register_small_dim(py::module_& m) {
  using py::arg;
  m.def("empirical_denoise_small_dim", &small_dim_forward, py::call_guard<py::gil_scoped_release>(), py::kw_only(),
        arg("x_ptr"), arg("y_ptr"), arg("y_dtype"), arg("batch"), arg("rows"), arg("dim"), arg("inv2s2_ptr"),
        arg("gemm_err_coef"), arg("fp32_err_coef"), arg("rounding_coef"), arg("rescore_tol"), arg("band"),
        arg("tiny_tol"), arg("out_ptr"), arg("logz_ptr"), arg("redo_ptr"),
        arg("parallel_min_work"), arg("threads"),
        "Empirical denoiser for small rows in one call: float64 Gram, bounded logits (exact re-scoring "
        "where the bound is loose), weights and the weighted sum, query blocks of 4 over the whole set.");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(empirical_denoise_small_dim, diffcore::register_small_dim);
