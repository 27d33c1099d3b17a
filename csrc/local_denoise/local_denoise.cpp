// Analytic local denoisers (ELS, LS, PSPC, masked same-location), CPU part: one training tile at a
// time, fused distances + streamed log-sum-exp + weighted sums, never materializing the keys.
//
// The Python side (diffcore/ops/_local_denoise_cpu.py) decodes and pads one tile of training images
// at a time and calls one of the kernels below for it; the per-query running state
//   dmin  [Q] double: the smallest key distance seen so far (the running max logit is -dmin c),
//   total [Q] double: sum of exp(-(d - dmin) c) over the keys seen,
//   acc   [Q, V] double: sum of exp(-(d - dmin) c) value,
// with c = 1 / (2 sigma^2), persists across tiles (a streamed log-sum-exp: exact, every key counted;
// keys with (d - dmin) c > band weigh below exp(-band) of the best one and add nothing).
//
// - translated_tile (els): the query of pixel (i, j) is the C x P x P patch of the padded noisy image
//   at (i, j); its keys are the patches of every training image of the tile at the locations
//   rows [row_lo[i], row_hi[i]) x cols [col_lo[j], col_hi[j]) (all of them with circular padding; the
//   boundary-broken dictionaries with zero padding), value = the key's centre pixel (C values).
//   Vectorized over the tile's images (the tile is passed image-innermost).
// - same_location_tile (mask; the CUDA kernel's ls and pspc share its arguments): the query of
//   location q is a weighted list of pixels (support, weights: query precisions); the keys are the
//   same pixels of each training image; the values are the pixels out_index[q] of the training image
//   (C values each). Vectorized over the training images (the tile is passed pixel-major, [H*W, C, T]).
// - box_ls_tile, box_pspc_tile (ls, pspc): the unit-weight square supports by separable box sums of
//   the per-pixel squared differences (the "Box-sum path" section below).
// - box_els_tile (els, where it takes fewer operations than translated_tile): the distances of every
//   pixel to the keys at one shift by box sums of the shifted squared differences ("ELS by shifted box
//   sums" below).
//
// Distances are accumulated in double, difference first (no |x|^2 + |y|^2 - 2 x.y cancellation), from
// the fp32 pixels (exact in double): relative error at most gamma_{D+1} with u = 2^-53, so that a
// logit -d / (2 sigma^2) is off by at most gamma_{D+1} d / (2 sigma^2) (1e-9 at d = 100, D = 243,
// sigma = 1e-3). Weights are fp32 exp of the float64 logit difference (relative error ~2e-7).
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/registry.h"
#ifdef DIFFCORE_WITH_CUDA
#include "local_denoise/local_denoise_cuda.h"
#endif

namespace py = pybind11;

namespace diffcore {
namespace {

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// exp(-t) for t >= 0 in fp32 (Cody-Waite reduction by ln 2, degree-6 polynomial of Cephes' expf:
// relative error below 2e-7), branch-free so that the loops calling it vectorize. t is clamped
// at 87 (exp(-87) ~ 1.6e-38, the smallest normal float); callers zero weights beyond `band` anyway.
inline float exp_neg(float t) {
  const float x = -std::min(t, 87.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(k, -0.693359375f, x);
  r = std::fma(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A running state's best distance becomes min(dmin, new_min); a new best rescales the weight sum
// and the `values` accumulators by exp(-(dmin - new_min) c) (0 from the empty state: one exp), so
// that every weight stays exp(-(d - dmin) c) <= 1. Returns that scale (1 when nothing changed), for
// callers with more accumulators to rescale.
inline double merge_min(double new_min, double c, double& dmin, double& total, double* acc, int64_t values) {
  if (!(new_min < dmin)) return 1.0;
  const double scale = std::isinf(dmin) ? 0.0 : std::exp(-(dmin - new_min) * c);
  total *= scale;
  for (int64_t v = 0; v < values; ++v) acc[v] *= scale;
  dmin = new_min;
  return scale;
}

// Folds one block of key distances into a query's running state: a new minimum rescales the sum
// and the accumulator (one exp), then every key gets w = exp(-(d - dmin) c) (0 beyond the band, fp32),
// written to `weight`; sums are float64 (a tile of a query holds up to H W T keys: fp32 sums of
// 10^4 terms lost 2e-5). Returns the block's weight sum. The loops run in explicit chunks of
// kWeightLanes (lane l takes the keys k = l mod kWeightLanes, the lanes summed in one fixed order), so
// that they vectorize without relying on the compiler's reduction rules and round the same way on
// every machine; the selects are branch-free.
constexpr int64_t kWeightLanes = 8;

inline double block_weights(const double* dist, float* weight, int64_t count, double c, float band, double& dmin,
                           double& total, double* acc, int64_t values) {
  double lane_min[kWeightLanes];
  for (int64_t l = 0; l < kWeightLanes; ++l) lane_min[l] = kInfinity;
  int64_t k0 = 0;
  for (; k0 + kWeightLanes <= count; k0 += kWeightLanes)
    for (int64_t l = 0; l < kWeightLanes; ++l) lane_min[l] = dist[k0 + l] < lane_min[l] ? dist[k0 + l] : lane_min[l];
  for (int64_t k = k0, l = 0; k < count; ++k, ++l) lane_min[l] = dist[k] < lane_min[l] ? dist[k] : lane_min[l];
  double block_min = kInfinity;
  for (int64_t l = 0; l < kWeightLanes; ++l) block_min = lane_min[l] < block_min ? lane_min[l] : block_min;
  merge_min(block_min, c, dmin, total, acc, values);
  const double base = dmin;
  double lane_sum[kWeightLanes] = {};
  auto weigh = [&](int64_t k) {  // >= 0: exact but for one rounding
    const float t = static_cast<float>((dist[k] - base) * c);
    const float e = exp_neg(t);
    return t > band ? 0.0f : e;
  };
  for (k0 = 0; k0 + kWeightLanes <= count; k0 += kWeightLanes) {
    float w[kWeightLanes];
    for (int64_t l = 0; l < kWeightLanes; ++l) w[l] = weigh(k0 + l);
    for (int64_t l = 0; l < kWeightLanes; ++l) {
      weight[k0 + l] = w[l];
      lane_sum[l] += static_cast<double>(w[l]);
    }
  }
  for (int64_t k = k0, l = 0; k < count; ++k, ++l) {
    weight[k] = weigh(k);
    lane_sum[l] += static_cast<double>(weight[k]);
  }
  const double* v = lane_sum;
  const double sum = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  total += sum;
  return sum;
}

constexpr int64_t kLanes = 16;  // training images per vector chunk (the tile is a multiple of it)

struct TranslatedShape {
  int64_t batch, tile, valid, channels, height, width, patch;
  int64_t padded_h() const { return height + patch - 1; }
  int64_t padded_w() const { return width + patch - 1; }
  int64_t image() const { return channels * padded_h() * padded_w(); }
};

// Distances of one query patch to the keys at (kr, kc) of the tile's images, kLanes images at a
// time: the tile is image-innermost ([C, H+P-1, W+P-1, T]) so that every load is a full vector
// whatever the dictionary's size (a corner pixel of a zero-padded image has one key per image).
inline void key_distances(const double* query, const float* y, const TranslatedShape& s, int64_t kr, int64_t kc,
                          double* dist) {
  const int64_t ph = s.padded_h(), pw = s.padded_w(), p = s.patch, t = s.tile;
  for (int64_t t0 = 0; t0 < t; t0 += kLanes) {
    double d[kLanes] = {};
    for (int64_t ch = 0; ch < s.channels; ++ch) {
      for (int64_t di = 0; di < p; ++di) {
        const float* yrow = y + ((ch * ph + kr + di) * pw + kc) * t + t0;
        const double* qrow = query + (ch * p + di) * p;
        for (int64_t dj = 0; dj < p; ++dj) {
          const double xv = qrow[dj];
          const float* ys = yrow + dj * t;
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const double diff = xv - static_cast<double>(ys[l]);
            d[l] += diff * diff;
          }
        }
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) dist[t0 + l] = t0 + l < s.valid ? d[l] : kInfinity;
  }
}

// One query pixel against every image of the tile (translated keys).
void translated_query(const float* xq_image, const float* y, const TranslatedShape& s, int64_t i, int64_t j,
                      int32_t rlo, int32_t rhi, int32_t clo, int32_t chi, double c, float band, double& dmin,
                      double& total, double* acc, std::vector<double>& dist, std::vector<float>& weight,
                      std::vector<double>& query) {
  const int64_t ph = s.padded_h(), pw = s.padded_w(), p = s.patch, r = p / 2, t = s.tile;
  const int64_t nrows = rhi - rlo, ncols = chi - clo, count = nrows * ncols * t;
  for (int64_t ch = 0; ch < s.channels; ++ch)  // the query patch, [C, P, P]
    for (int64_t di = 0; di < p; ++di)
      for (int64_t dj = 0; dj < p; ++dj) query[(ch * p + di) * p + dj] = xq_image[(ch * ph + i + di) * pw + j + dj];
  for (int64_t kr = 0; kr < nrows; ++kr)
    for (int64_t kc = 0; kc < ncols; ++kc)
      key_distances(query.data(), y, s, rlo + kr, clo + kc, dist.data() + (kr * ncols + kc) * t);
  block_weights(dist.data(), weight.data(), count, c, band, dmin, total, acc, s.channels);
  for (int64_t ch = 0; ch < s.channels; ++ch) {  // values: the keys' centre pixels
    double part = 0.0;
    for (int64_t kr = 0; kr < nrows; ++kr) {
      const float* centre = y + ((ch * ph + rlo + kr + r) * pw + clo + r) * t;
      const float* w = weight.data() + kr * ncols * t;
#pragma omp simd reduction(+ : part)
      for (int64_t k = 0; k < ncols * t; ++k) part += static_cast<double>(w[k]) * centre[k];
    }
    acc[ch] += part;
  }
}

// Argument checks shared by the CPU and CUDA entry points (non-null pointers, positive sizes).
void check_translated(std::uintptr_t xq_ptr, std::uintptr_t y_ptr, std::uintptr_t row_lo_ptr, std::uintptr_t row_hi_ptr,
                      std::uintptr_t col_lo_ptr, std::uintptr_t col_hi_ptr, std::uintptr_t inv2s2_ptr,
                      std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr, int64_t batch,
                      int64_t tile, int64_t channels, int64_t height, int64_t width, int64_t patch) {
  for (auto [ptr, name] : {std::pair{xq_ptr, "xq"}, {y_ptr, "y"}, {row_lo_ptr, "row_lo"}, {row_hi_ptr, "row_hi"},
                           {col_lo_ptr, "col_lo"}, {col_hi_ptr, "col_hi"}, {inv2s2_ptr, "inv2s2"},
                           {dmin_ptr, "dmin"}, {total_ptr, "total"}, {acc_ptr, "acc"}})
    check_ptr(ptr, name);
  for (auto [v, name] : {std::pair{batch, "batch"}, {tile, "tile"}, {channels, "channels"}, {height, "height"},
                         {width, "width"}, {patch, "patch"}})
    check_positive(v, name);
  check_arg(patch % 2 == 1, "patch", "expected an odd patch size");
}

void check_same_location(std::uintptr_t x_ptr, std::uintptr_t y_ptr, std::uintptr_t support_offsets_ptr,
                         std::uintptr_t support_index_ptr, std::uintptr_t support_weight_ptr,
                         std::uintptr_t out_offsets_ptr, std::uintptr_t out_index_ptr, std::uintptr_t inv2s2_ptr,
                         std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr, int64_t batch,
                         int64_t tile, int64_t channels, int64_t pixels, int64_t locations) {
  for (auto [ptr, name] : {std::pair{x_ptr, "x"}, {y_ptr, "y"}, {support_offsets_ptr, "support_offsets"},
                           {support_index_ptr, "support_index"}, {support_weight_ptr, "support_weight"},
                           {out_offsets_ptr, "out_offsets"}, {out_index_ptr, "out_index"}, {inv2s2_ptr, "inv2s2"},
                           {dmin_ptr, "dmin"}, {total_ptr, "total"}, {acc_ptr, "acc"}})
    check_ptr(ptr, name);
  for (auto [v, name] : {std::pair{batch, "batch"}, {tile, "tile"}, {channels, "channels"}, {pixels, "pixels"},
                         {locations, "locations"}})
    check_positive(v, name);
}

void translated_tile(std::uintptr_t xq_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t valid,
                     int64_t channels,
                     int64_t height, int64_t width, int64_t patch, std::uintptr_t row_lo_ptr, std::uintptr_t row_hi_ptr,
                     std::uintptr_t col_lo_ptr, std::uintptr_t col_hi_ptr, std::uintptr_t inv2s2_ptr, double band,
                     std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr, int threads) {
  check_translated(xq_ptr, y_ptr, row_lo_ptr, row_hi_ptr, col_lo_ptr, col_hi_ptr, inv2s2_ptr, dmin_ptr, total_ptr,
                   acc_ptr, batch, tile, channels, height, width, patch);
  check_arg(tile % kLanes == 0, "tile", "expected a multiple of 16 images");
  check_arg(0 < valid && valid <= tile, "valid", "expected 0 < valid <= tile");
  const TranslatedShape s{batch, tile, valid, channels, height, width, patch};
  const auto* xq = reinterpret_cast<const float*>(xq_ptr);
  const auto* y = reinterpret_cast<const float*>(y_ptr);
  const auto* row_lo = reinterpret_cast<const int32_t*>(row_lo_ptr);
  const auto* row_hi = reinterpret_cast<const int32_t*>(row_hi_ptr);
  const auto* col_lo = reinterpret_cast<const int32_t*>(col_lo_ptr);
  const auto* col_hi = reinterpret_cast<const int32_t*>(col_hi_ptr);
  for (int64_t i = 0; i < height; ++i)
    check_arg(0 <= row_lo[i] && row_lo[i] < row_hi[i] && row_hi[i] <= height, "row_lo/row_hi",
              "expected 0 <= lo < hi <= height for every row");
  for (int64_t j = 0; j < width; ++j)
    check_arg(0 <= col_lo[j] && col_lo[j] < col_hi[j] && col_hi[j] <= width, "col_lo/col_hi",
              "expected 0 <= lo < hi <= width for every column");
  const auto* inv2s2 = reinterpret_cast<const double*>(inv2s2_ptr);
  auto* dmin = reinterpret_cast<double*>(dmin_ptr);
  auto* total = reinterpret_cast<double*>(total_ptr);
  auto* acc = reinterpret_cast<double*>(acc_ptr);
  const int64_t pixels = height * width, queries = batch * pixels;
  const float fband = static_cast<float>(band);
#pragma omp parallel num_threads(resolve_threads(threads))
  {
    std::vector<double> dist(pixels * tile), query(channels * patch * patch);
    std::vector<float> weight(pixels * tile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t qi = 0; qi < queries; ++qi) {
      const int64_t b = qi / pixels, i = (qi % pixels) / width, j = qi % width;
      translated_query(xq + b * s.image(), y, s, i, j, row_lo[i], row_hi[i], col_lo[j], col_hi[j], inv2s2[b],
                       fband, dmin[qi], total[qi], acc + qi * channels, dist, weight, query);
    }
  }
}

constexpr int64_t kQueryBlock = 4;  // same-location queries (images at one location) sharing each key load
constexpr int64_t kChunk = 8;       // training images per register block of the same-location kernel

// Distances of kQueryBlock queries (the images xq[j] [C, H*W] at one location) to the keys of one
// same-location tile y [H*W, C, T]: dist[j * T + n] = sum_k w_k sum_ch (x_j[ch, p_k] - y_n[ch, p_k])^2
// over the location's support (p_k, w_k). Each key value is loaded and widened once for all the
// queries; every query's sum runs in the same order (k, then ch) whatever the block, so a query's
// result does not depend on which images share its block.
template <int64_t Len, bool UnitWeights>
inline void same_location_chunk(const float* const* xq, const float* y, int64_t n0, int64_t tile, int64_t channels,
                                const int32_t* support, const float* weights, int64_t support_size, int64_t pixels,
                                double* dist) {
  double d[kQueryBlock][Len] = {};
  for (int64_t k = 0; k < support_size; ++k) {
    const double precision = weights[k];
    for (int64_t ch = 0; ch < channels; ++ch) {
      const int64_t at = ch * pixels + support[k];
      const float* yrow = y + (static_cast<int64_t>(support[k]) * channels + ch) * tile + n0;
      double yv[Len];
#pragma omp simd
      for (int64_t l = 0; l < Len; ++l) yv[l] = static_cast<double>(yrow[l]);
      for (int64_t j = 0; j < kQueryBlock; ++j) {
        const double xv = xq[j][at];
#pragma omp simd
        for (int64_t l = 0; l < Len; ++l) {
          const double diff = xv - yv[l];
          if constexpr (UnitWeights) {
            d[j][l] += diff * diff;  // binary supports (ls, pspc): one operation less per term
          } else {
            d[j][l] += precision * (diff * diff);
          }
        }
      }
    }
  }
  for (int64_t j = 0; j < kQueryBlock; ++j)
    for (int64_t l = 0; l < Len; ++l) dist[j * tile + n0 + l] = d[j][l];
}

inline void same_location_distances(const float* const* xq, const float* y, int64_t tile, int64_t channels,
                                    const int32_t* support, const float* weights, int64_t support_size,
                                    int64_t pixels, double* dist) {
  bool unit = true;
  for (int64_t k = 0; k < support_size; ++k) unit = unit && weights[k] == 1.0f;
  auto run = [&](auto full, auto one) {
    int64_t n0 = 0;
    for (; n0 + kChunk <= tile; n0 += kChunk) full(n0);
    for (; n0 < tile; ++n0) one(n0);  // the tail, one image at a time (the same arithmetic per image)
  };
  auto args = [&](auto chunk) {
    return [&, chunk](int64_t n0) { chunk(xq, y, n0, tile, channels, support, weights, support_size, pixels, dist); };
  };
  if (unit)
    run(args(same_location_chunk<kChunk, true>), args(same_location_chunk<1, true>));
  else
    run(args(same_location_chunk<kChunk, false>), args(same_location_chunk<1, false>));
}

// part[j] = sum_n weight[j * T + n] yrow[n] for the kQueryBlock queries, in float64, summed in
// kChunk lanes (lane l takes n = l mod kChunk) and the lanes in one fixed order: the same rounding
// for every query whatever its block.
inline void weighted_sums(const float* weight, const float* yrow, int64_t tile, double* part) {
  double lanes[kQueryBlock][kChunk] = {};
  int64_t n0 = 0;
  for (; n0 + kChunk <= tile; n0 += kChunk) {
    double yv[kChunk];
#pragma omp simd
    for (int64_t l = 0; l < kChunk; ++l) yv[l] = static_cast<double>(yrow[n0 + l]);
    for (int64_t j = 0; j < kQueryBlock; ++j) {
      const float* w = weight + j * tile + n0;
#pragma omp simd
      for (int64_t l = 0; l < kChunk; ++l) lanes[j][l] += static_cast<double>(w[l]) * yv[l];
    }
  }
  for (int64_t l = 0; n0 < tile; ++n0, ++l)
    for (int64_t j = 0; j < kQueryBlock; ++j) lanes[j][l] += static_cast<double>(weight[j * tile + n0]) * yrow[n0];
  for (int64_t j = 0; j < kQueryBlock; ++j) {
    const double* v = lanes[j];
    part[j] = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}

void same_location_tile(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t channels,
                        int64_t pixels, int64_t locations, std::uintptr_t support_offsets_ptr,
                        std::uintptr_t support_index_ptr, std::uintptr_t support_weight_ptr,
                        std::uintptr_t out_offsets_ptr, std::uintptr_t out_index_ptr, std::uintptr_t inv2s2_ptr,
                        double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr,
                        int threads) {
  check_same_location(x_ptr, y_ptr, support_offsets_ptr, support_index_ptr, support_weight_ptr, out_offsets_ptr,
                      out_index_ptr, inv2s2_ptr, dmin_ptr, total_ptr, acc_ptr, batch, tile, channels, pixels, locations);
  const auto* x = reinterpret_cast<const float*>(x_ptr);          // [B, C, H*W]
  const auto* y = reinterpret_cast<const float*>(y_ptr);          // [H*W, C, T]
  const auto* sup_off = reinterpret_cast<const int64_t*>(support_offsets_ptr);
  const auto* sup_idx = reinterpret_cast<const int32_t*>(support_index_ptr);
  const auto* sup_w = reinterpret_cast<const float*>(support_weight_ptr);
  const auto* out_off = reinterpret_cast<const int64_t*>(out_offsets_ptr);
  const auto* out_idx = reinterpret_cast<const int32_t*>(out_index_ptr);
  for (int64_t k = 0; k < sup_off[locations]; ++k)
    check_arg(0 <= sup_idx[k] && sup_idx[k] < pixels, "support_index", "expected pixel indices in [0, H*W)");
  for (int64_t k = 0; k < out_off[locations]; ++k)
    check_arg(0 <= out_idx[k] && out_idx[k] < pixels, "out_index", "expected pixel indices in [0, H*W)");
  const auto* inv2s2 = reinterpret_cast<const double*>(inv2s2_ptr);
  auto* dmin = reinterpret_cast<double*>(dmin_ptr);
  auto* total = reinterpret_cast<double*>(total_ptr);
  auto* acc = reinterpret_cast<double*>(acc_ptr);  // [B, out_off[locations], C]
  const int64_t values_per_image = out_off[locations] * channels;
  const float fband = static_cast<float>(band);
  const int64_t blocks = (batch + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel num_threads(resolve_threads(threads))
  {
    std::vector<double> dist(kQueryBlock * tile);
    std::vector<float> weight(kQueryBlock * tile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < locations * blocks; ++item) {
      const int64_t q = item / blocks, b0 = (item % blocks) * kQueryBlock;
      const int64_t count = std::min(kQueryBlock, batch - b0);
      const float* xq[kQueryBlock];
      for (int64_t j = 0; j < kQueryBlock; ++j) xq[j] = x + std::min(b0 + j, batch - 1) * channels * pixels;
      same_location_distances(xq, y, tile, channels, sup_idx + sup_off[q], sup_w + sup_off[q],
                              sup_off[q + 1] - sup_off[q], pixels, dist.data());
      const int64_t values = (out_off[q + 1] - out_off[q]) * channels;
      double* qacc[kQueryBlock];
      for (int64_t j = 0; j < count; ++j) {
        const int64_t qi = (b0 + j) * locations + q;
        qacc[j] = acc + (b0 + j) * values_per_image + out_off[q] * channels;
        block_weights(dist.data() + j * tile, weight.data() + j * tile, tile, inv2s2[b0 + j], fband, dmin[qi],
                      total[qi], qacc[j], values);
      }
      for (int64_t j = count; j < kQueryBlock; ++j) {  // padding queries of the last block: weights 0
        qacc[j] = nullptr;
        std::fill(weight.begin() + j * tile, weight.begin() + (j + 1) * tile, 0.0f);
      }
      for (int64_t o = out_off[q]; o < out_off[q + 1]; ++o) {
        for (int64_t ch = 0; ch < channels; ++ch) {
          double part[kQueryBlock];
          weighted_sums(weight.data(), y + (static_cast<int64_t>(out_idx[o]) * channels + ch) * tile, tile, part);
          for (int64_t j = 0; j < count; ++j) qacc[j][(o - out_off[q]) * channels + ch] += part[j];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Box-sum path (ls with zero or circular padding, pspc): unit-weight square supports.
//
// The distance of a P x P patch is a 2D box sum of the per-pixel squared differences
//   e[p][n] = sum_ch (x[ch, p] - y_n[ch, p])^2   (float64, difference first),
// summed separably (rows, then columns) over the image extended by `pad` on every side (zeros:
// padded entries are 0 for query and key alike, so the sum over the in-image pixels is exact and the
// padding is never stored; circular: wrapped copies, a pixel repeated when P exceeds the image
// counted each time). Every term is >= 0, so any fixed summation tree keeps the relative error at
// most gamma_{C - 1 + 2 (P - 1)} <= gamma_{D + 1}, the bound of the CSR path. Each axis sums its
// windows left to right, or by van Herk / Gil-Werman's block prefix and suffix sums where that is
// cheaper (three additions per element whatever P: window [j, j + P) = the suffix of its first block
// from j + the prefix of the next block up to j + P - 1), so the cost does not grow with P. kBoxLanes
// training images are summed side by side; the tile is chunk-major, [T / kBoxLanes, H*W, C, kBoxLanes],
// so that each chunk's values are read in one sequential sweep.
//
// Per query image: (1) the distances of every window to the tile's images, chunk by chunk, into a
// buffer [T / kBoxLanes, windows, kBoxLanes] (float64), with each window's minimum; (2) the state's
// dmin updated first (one rescaling exp per window and tile, as block_weights), so that every weight
// w = exp(-(d - dmin) c) (fp32, 0 beyond the band) is taken against the tile's final best; (3) the
// sums, in kBoxLanes lanes per window reduced in one fixed order: a query's result does not depend on
// the batch, the thread or the chunking.
//
// pspc: out[c, p] = (1 / count(p)) sum_n a[p, n] y_n[c, p] with a[p, n] = sum_{squares q covering p}
// w[q, n] / total[q] (the normalized weights, summed by the adjoint box sum: the squares' grid
// extended by P - 1 zeros), instead of one weighted sum per (square, pixel of the square). The
// normalization needs each square's total over ALL training images: stage "totals" streams (dmin,
// total) over the tiles, stage "means" then adds every tile's sum_n a[p, n] y_n[c, p] with the final
// (dmin, total); stage "single" (one tile holds the whole set, fresh state) does both from one
// distance pass (steps (1)-(3) above, the weights kept in the distance buffer). The two multi-tile
// stages keep no tile-wide buffer: each chunk's distances are used as soon as they are summed
// ("totals" rescales a square's total and lanes at each new best, one exp; "means" weighs against
// the final state), so "single" and "totals" then "means" agree to rounding, not bitwise.
constexpr int64_t kBoxLanes = 16;  // training images per vector of the box-sum path

// One axis of a box sum: out[j] = sum of in[k] over k in [j - left, j - left + patch) n [0, n),
// j < count (the input extended by `left` zeros; absent terms are not added).
struct WindowAxis {
  int64_t n, left, count, patch;
  bool blocked;  // van Herk / Gil-Werman (fewer additions than direct sums here)
};

WindowAxis window_axis(int64_t n, int64_t left, int64_t count, int64_t patch) {
  int64_t direct = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - left), hi = std::min(n, j - left + patch);
    direct += std::max<int64_t>(0, hi - lo - 1);
  }
  return {n, left, count, patch, 2 * n + count < direct};
}

inline void copy_elem(double* out, const double* a, int64_t elem) {
#pragma omp simd
  for (int64_t l = 0; l < elem; ++l) out[l] = a[l];
}

inline void add_elem(double* out, const double* a, const double* b, int64_t elem) {
#pragma omp simd
  for (int64_t l = 0; l < elem; ++l) out[l] = a[l] + b[l];
}

// The window sums of one line of elements of `elem` doubles (a multiple of kBoxLanes; contiguous,
// `elem` apart, in and out).
// `prefix` and `suffix` hold n elements (blocked axes only).
void window_line(const double* in, double* out, const WindowAxis& a, int64_t elem, double* prefix, double* suffix) {
  const int64_t n = a.n, p = a.patch;
  if (!a.blocked) {
    for (int64_t j = 0; j < a.count; ++j) {
      const int64_t lo = std::max<int64_t>(0, j - a.left), hi = std::min(n, j - a.left + p);
      double* o = out + j * elem;
      if (lo >= hi) {
        std::fill(o, o + elem, 0.0);
        continue;
      }
      if (hi - lo == 1) {
        copy_elem(o, in + lo * elem, elem);
        continue;
      }
      for (int64_t l0 = 0; l0 < elem; l0 += kBoxLanes) {  // in registers, kBoxLanes doubles at a time
        // (no plain copy into s: GCC made it 16-byte stores that stalled the 32-byte loads after them)
        double s[kBoxLanes];
        const double* first = in + lo * elem + l0;
        const double* second = first + elem;
#pragma omp simd
        for (int64_t l = 0; l < kBoxLanes; ++l) s[l] = first[l] + second[l];
        for (int64_t k = lo + 2; k < hi; ++k) {
          const double* next = in + k * elem + l0;
#pragma omp simd
          for (int64_t l = 0; l < kBoxLanes; ++l) s[l] += next[l];
        }
#pragma omp simd
        for (int64_t l = 0; l < kBoxLanes; ++l) o[l0 + l] = s[l];
      }
    }
    return;
  }
  // blocks of the extended line: [m p, (m + 1) p) in e = k + left
  for (int64_t k = 0; k < n; ++k) {
    if (k == 0 || (k + a.left) % p == 0)
      copy_elem(prefix + k * elem, in + k * elem, elem);
    else
      add_elem(prefix + k * elem, prefix + (k - 1) * elem, in + k * elem, elem);
  }
  for (int64_t k = n - 1; k >= 0; --k) {
    if (k == n - 1 || (k + a.left + 1) % p == 0)
      copy_elem(suffix + k * elem, in + k * elem, elem);
    else
      add_elem(suffix + k * elem, in + k * elem, suffix + (k + 1) * elem, elem);
  }
  for (int64_t j = 0; j < a.count; ++j) {
    const int64_t first_k = j - a.left, last_k = j + p - 1 - a.left;
    const double* first = nullptr;  // the window's part in the block of its first position
    if (first_k >= 0 && first_k < n) {
      first = suffix + first_k * elem;
    } else if (first_k < 0) {
      const int64_t block_last = std::min((j / p) * p + p - 1 - a.left, n - 1);
      if (block_last >= 0) first = prefix + block_last * elem;
    }
    const double* second = nullptr;  // the part in the next block (none when the window is one block)
    if (j % p != 0) {
      if (last_k >= 0 && last_k < n) {
        second = prefix + last_k * elem;
      } else if (last_k >= n) {
        const int64_t block_first = std::max<int64_t>(((j + p - 1) / p) * p - a.left, 0);
        if (block_first < n) second = suffix + block_first * elem;
      }
    }
    double* o = out + j * elem;
    if (first && second)
      add_elem(o, first, second, elem);
    else if (first || second)
      copy_elem(o, first ? first : second, elem);
    else
      std::fill(o, o + elem, 0.0);
  }
}

inline int64_t wrap(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// A 2D box sum of a grid [h, w] of lane vectors: `left` zeros (or, circular, `left` wrapped
// elements) before each axis, windows of `patch`, out [count_h, count_w] (contiguous).
struct BoxPlan {
  int64_t h, w, left;
  bool circular;
  WindowAxis along_rows, along_cols;
  int64_t in_w() const { return circular ? w + 2 * left : w; }  // elements per stored input row
  int64_t mid_h() const { return circular ? h + 2 * left : h; }  // rows of the row sums
  int64_t out_h() const { return along_cols.count; }
  int64_t out_w() const { return along_rows.count; }
};

BoxPlan box_plan(int64_t h, int64_t w, int64_t left, int64_t count_h, int64_t count_w, int64_t patch, bool circular) {
  if (circular)  // the wrapped elements are stored: the axes see an extended line, no zeros
    return {h, w, left, true, window_axis(w + 2 * left, 0, count_w, patch), window_axis(h + 2 * left, 0, count_h, patch)};
  return {h, w, left, false, window_axis(w, left, count_w, patch), window_axis(h, left, count_h, patch)};
}

// Scratch of one thread for the box sums of a plan.
struct BoxScratch {
  std::vector<double> in, mid, prefix, suffix;
  explicit BoxScratch(const BoxPlan& g)
      : in(g.h * g.in_w() * kBoxLanes, 0.0),
        mid(g.mid_h() * g.out_w() * kBoxLanes, 0.0),
        prefix(std::max(g.in_w(), g.mid_h() * g.out_w()) * kBoxLanes),
        suffix(prefix.size()) {}
  // Where the caller writes the grid's element (i, j), i < h, j < w.
  double* at(const BoxPlan& g, int64_t i, int64_t j) {
    return in.data() + (i * g.in_w() + (g.circular ? g.left : 0) + j) * kBoxLanes;
  }
};

// The box sums of the grid the caller wrote into s (via s.at): out [out_h, out_w, kBoxLanes].
void box_sums(const BoxPlan& g, BoxScratch& s, double* out) {
  constexpr int64_t L = kBoxLanes;
  const int64_t iw = g.in_w(), ow = g.out_w();
  if (g.circular) {  // the wrapped columns
    for (int64_t i = 0; i < g.h; ++i)
      for (int64_t jp = 0; jp < iw; ++jp)
        if (jp < g.left || jp >= g.left + g.w)
          copy_elem(s.in.data() + (i * iw + jp) * L, s.in.data() + (i * iw + g.left + wrap(jp - g.left, g.w)) * L, L);
  }
  const int64_t row0 = g.circular ? g.left : 0;
  for (int64_t i = 0; i < g.h; ++i)
    window_line(s.in.data() + i * iw * L, s.mid.data() + (row0 + i) * ow * L, g.along_rows, L, s.prefix.data(),
                s.suffix.data());
  if (g.circular) {  // the wrapped rows of the row sums
    for (int64_t ip = 0; ip < g.mid_h(); ++ip)
      if (ip < g.left || ip >= g.left + g.h)
        copy_elem(s.mid.data() + ip * ow * L, s.mid.data() + (g.left + wrap(ip - g.left, g.h)) * ow * L, ow * L);
  }
  window_line(s.mid.data(), out, g.along_cols, ow * L, s.prefix.data(), s.suffix.data());  // whole rows at once
}

// sum of kBoxLanes lanes in one fixed order
inline double lane_reduce(const double* v) {
  return (((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]))) +
         (((v[8] + v[9]) + (v[10] + v[11])) + ((v[12] + v[13]) + (v[14] + v[15])));
}

// fp32 weights exp(-(d - base) c) of kBoxLanes keys, 0 beyond the band (the formula of block_weights).
inline void lane_weights(const double* d, double base, double c, float band, float* w) {
#pragma omp simd
  for (int64_t l = 0; l < kBoxLanes; ++l) {
    const float t = static_cast<float>((d[l] - base) * c);
    const float e = exp_neg(t);
    w[l] = t > band ? 0.0f : e;
  }
}

struct BoxTile {
  const float* x;  // [B, C, H*W]
  const float* y;  // [T / kBoxLanes, H*W, C, kBoxLanes], T a multiple of kBoxLanes, images >= valid zero
  int64_t batch, tile, valid, channels, height, width, patch;
  const double* inv2s2;
  float band;
  double *dmin, *total, *acc;
  int64_t pixels() const { return height * width; }
  int64_t chunks() const { return tile / kBoxLanes; }
  // pixel p's C x kBoxLanes values of the images of one chunk
  const float* chunk_values(int64_t chunk, int64_t p) const { return y + (chunk * pixels() + p) * channels * kBoxLanes; }
};

BoxTile box_tile(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t valid,
                 int64_t channels, int64_t height, int64_t width, int64_t patch, std::uintptr_t inv2s2_ptr,
                 double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr) {
  for (auto [ptr, name] : {std::pair{x_ptr, "x"}, {y_ptr, "y"}, {inv2s2_ptr, "inv2s2"}, {dmin_ptr, "dmin"},
                           {total_ptr, "total"}, {acc_ptr, "acc"}})
    check_ptr(ptr, name);
  for (auto [v, name] : {std::pair{batch, "batch"}, {tile, "tile"}, {channels, "channels"}, {height, "height"},
                         {width, "width"}, {patch, "patch"}})
    check_positive(v, name);
  check_arg(patch % 2 == 1, "patch", "expected an odd patch size");
  check_arg(tile % kBoxLanes == 0, "tile", "expected a multiple of 16 images");
  check_arg(0 < valid && valid <= tile, "valid", "expected 0 < valid <= tile");
  return BoxTile{reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const float*>(y_ptr), batch, tile, valid,
                 channels, height, width, patch, reinterpret_cast<const double*>(inv2s2_ptr),
                 static_cast<float>(band), reinterpret_cast<double*>(dmin_ptr), reinterpret_cast<double*>(total_ptr),
                 reinterpret_cast<double*>(acc_ptr)};
}

// e[l] = sum_ch (x[ch * pixels] - y[ch * kBoxLanes + l])^2: the squared differences of one query
// pixel (x: its channel 0, channels `pixels` apart) to the kBoxLanes images of one chunk at one key
// pixel (y: [C, kBoxLanes]), in float64, difference first.
inline void pixel_squared_differences(const float* x, int64_t pixels, const float* y, int64_t channels, double* e) {
  constexpr int64_t L = kBoxLanes;
  const double x0 = x[0];
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) {
    const double diff = x0 - static_cast<double>(y[l]);
    e[l] = diff * diff;
  }
  for (int64_t ch = 1; ch < channels; ++ch) {
    const double xv = x[ch * pixels];
    const float* yc = y + ch * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const double diff = xv - static_cast<double>(yc[l]);
      e[l] += diff * diff;
    }
  }
}

// The distances of every window to the images of one chunk: d [windows, kBoxLanes], +inf for the
// padding images.
void chunk_distances(const BoxTile& t, const float* xb, const BoxPlan& g, BoxScratch& s, int64_t chunk, double* d) {
  constexpr int64_t L = kBoxLanes;
  const int64_t pixels = t.pixels(), windows = g.out_h() * g.out_w(), channels = t.channels;
  {
    const int64_t n0 = chunk * L;
    for (int64_t i = 0; i < t.height; ++i) {
      for (int64_t j = 0; j < t.width; ++j) {
        const int64_t p = i * t.width + j;
        pixel_squared_differences(xb + p, pixels, t.chunk_values(chunk, p), channels, s.at(g, i, j));
      }
      if (!g.circular)  // the row's window sums while its squared differences are in the L1 cache
        window_line(s.at(g, i, 0), s.mid.data() + i * g.out_w() * L, g.along_rows, L, s.prefix.data(),
                    s.suffix.data());
    }
    if (!g.circular) {  // the column sums of the row sums (box_sums' last step)
      window_line(s.mid.data(), d, g.along_cols, g.out_w() * L, s.prefix.data(), s.suffix.data());
    } else {
      box_sums(g, s, d);
    }
    if (n0 + L > t.valid)
      for (int64_t q = 0; q < windows; ++q)
        for (int64_t l = std::max<int64_t>(0, t.valid - n0); l < L; ++l) d[q * L + l] = kInfinity;
  }
}

// Step (1) for one query image xb [C, H*W]: dist [chunks, windows, kBoxLanes] and each window's
// minimum over the tile's real images (dmin_tile [windows]); the padding images get +inf.
void box_distances(const BoxTile& t, const float* xb, const BoxPlan& g, BoxScratch& s, double* dist,
                   double* lane_min, double* dmin_tile) {
  constexpr int64_t L = kBoxLanes;
  const int64_t windows = g.out_h() * g.out_w();
  std::fill(lane_min, lane_min + windows * L, kInfinity);
  for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
    double* d = dist + chunk * windows * L;
    chunk_distances(t, xb, g, s, chunk, d);
#pragma omp simd
    for (int64_t k = 0; k < windows * L; ++k) lane_min[k] = d[k] < lane_min[k] ? d[k] : lane_min[k];
  }
  for (int64_t q = 0; q < windows; ++q) {
    double m = kInfinity;
    for (int64_t l = 0; l < L; ++l) m = std::min(m, lane_min[q * L + l]);
    dmin_tile[q] = m;
  }
}

struct BoxBuffers {
  std::vector<double> dist, lane_min, dmin_tile, lane_total, lane_acc;
  // dist holds the distances of `dist_images` images (the tile's, or one chunk's)
  BoxBuffers(const BoxTile& t, int64_t windows, int64_t acc_rows, int64_t dist_images)
      : dist(dist_images * windows),
        lane_min(windows * kBoxLanes),
        dmin_tile(windows),
        lane_total(windows * kBoxLanes),
        lane_acc(acc_rows * t.channels * kBoxLanes) {}
};

// LS over one tile: the patch distances of every pixel by box sums, then per pixel the streamed
// log-sum-exp state and the weighted sums of its own values y_n[:, p].
void box_ls_tile(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t valid,
                 int64_t channels, int64_t height, int64_t width, int64_t patch, bool circular,
                 std::uintptr_t inv2s2_ptr, double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr,
                 std::uintptr_t acc_ptr, int threads) {
  constexpr int64_t L = kBoxLanes;
  const BoxTile t = box_tile(x_ptr, y_ptr, batch, tile, valid, channels, height, width, patch, inv2s2_ptr, band,
                             dmin_ptr, total_ptr, acc_ptr);
  const int64_t pixels = t.pixels();
  const BoxPlan g = box_plan(height, width, patch / 2, height, width, patch, circular);
#pragma omp parallel num_threads(resolve_threads(threads))
  {
    BoxScratch s(g);
    BoxBuffers buf(t, pixels, pixels, t.tile);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const double c = t.inv2s2[b];
      box_distances(t, t.x + b * channels * pixels, g, s, buf.dist.data(), buf.lane_min.data(), buf.dmin_tile.data());
      for (int64_t p = 0; p < pixels; ++p)
        merge_min(buf.dmin_tile[p], c, t.dmin[b * pixels + p], t.total[b * pixels + p],
                  t.acc + (b * pixels + p) * channels, channels);
      std::fill(buf.lane_total.begin(), buf.lane_total.end(), 0.0);
      std::fill(buf.lane_acc.begin(), buf.lane_acc.end(), 0.0);
      for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
        const double* d = buf.dist.data() + chunk * pixels * L;
        for (int64_t p = 0; p < pixels; ++p) {
          float w[L];
          lane_weights(d + p * L, t.dmin[b * pixels + p], c, t.band, w);
          double* lt = buf.lane_total.data() + p * L;
#pragma omp simd
          for (int64_t l = 0; l < L; ++l) lt[l] += static_cast<double>(w[l]);
          for (int64_t ch = 0; ch < channels; ++ch) {
            const float* yv = t.chunk_values(chunk, p) + ch * L;
            double* la = buf.lane_acc.data() + (p * channels + ch) * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) la[l] += static_cast<double>(w[l]) * static_cast<double>(yv[l]);
          }
        }
      }
      for (int64_t p = 0; p < pixels; ++p) {
        t.total[b * pixels + p] += lane_reduce(buf.lane_total.data() + p * L);
        for (int64_t ch = 0; ch < channels; ++ch)
          t.acc[(b * pixels + p) * channels + ch] += lane_reduce(buf.lane_acc.data() + (p * channels + ch) * L);
      }
    }
  }
}

// PSPC over one tile (stage "totals", "means" or "single"; see the section's head).
void box_pspc_tile(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t valid,
                   int64_t channels, int64_t height, int64_t width, int64_t patch, const std::string& stage,
                   std::uintptr_t inv2s2_ptr, double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr,
                   std::uintptr_t acc_ptr, int threads) {
  constexpr int64_t L = kBoxLanes;
  const BoxTile t = box_tile(x_ptr, y_ptr, batch, tile, valid, channels, height, width, patch, inv2s2_ptr, band,
                             dmin_ptr, total_ptr, acc_ptr);
  check_arg(stage == "totals" || stage == "means" || stage == "single", "stage",
            "expected 'totals', 'means' or 'single'");
  check_arg(patch <= height && patch <= width, "patch", "expected P <= min(height, width) (valid squares)");
  const bool totals = stage != "means", means = stage != "totals", single = stage == "single";
  const int64_t pixels = t.pixels(), rows = height - patch + 1, cols = width - patch + 1, squares = rows * cols;
  const BoxPlan g = box_plan(height, width, 0, rows, cols, patch, false);              // the squares' distances
  const BoxPlan adjoint = box_plan(rows, cols, patch - 1, height, width, patch, false);  // squares -> pixels
#pragma omp parallel num_threads(resolve_threads(threads))
  {
    BoxScratch s(g), sa(adjoint);
    // stage "means" needs no tile-wide distances: each chunk's are weighed as soon as they are summed
    // (and stage "totals" streams (dmin, total) chunk by chunk): only "single" keeps the tile's
    BoxBuffers buf(t, squares, pixels, single ? t.tile : kBoxLanes);
    std::vector<double> covering(pixels * L), inv_total(squares);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const double c = t.inv2s2[b];
      double* dmin = t.dmin + b * squares;
      double* total = t.total + b * squares;
      const float* xb = t.x + b * channels * pixels;
      if (totals && !single) {
        // a chunk's new best distance of a square rescales its total and its lanes (one exp), so that
        // every weight exp(-(d - dmin) c) is taken against the best distance seen so far (<= 1)
        std::fill(buf.lane_total.begin(), buf.lane_total.end(), 0.0);
        double* d = buf.dist.data();
        for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
          chunk_distances(t, xb, g, s, chunk, d);
          for (int64_t q = 0; q < squares; ++q) {
            double* lt = buf.lane_total.data() + q * L;
            double m = kInfinity;
            for (int64_t l = 0; l < L; ++l) m = std::min(m, d[q * L + l]);
            merge_min(m, c, dmin[q], total[q], lt, L);  // the square's total and its lanes
            float w[L];
            lane_weights(d + q * L, dmin[q], c, t.band, w);
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) lt[l] += static_cast<double>(w[l]);
          }
        }
        for (int64_t q = 0; q < squares; ++q) total[q] += lane_reduce(buf.lane_total.data() + q * L);
        continue;
      }
      if (single) box_distances(t, xb, g, s, buf.dist.data(), buf.lane_min.data(), buf.dmin_tile.data());
      if (single) {
        for (int64_t q = 0; q < squares; ++q) merge_min(buf.dmin_tile[q], c, dmin[q], total[q], nullptr, 0);
        std::fill(buf.lane_total.begin(), buf.lane_total.end(), 0.0);
        for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
          double* d = buf.dist.data() + chunk * squares * L;
          for (int64_t q = 0; q < squares; ++q) {
            float w[L];
            lane_weights(d + q * L, dmin[q], c, t.band, w);
            double* lt = buf.lane_total.data() + q * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) lt[l] += static_cast<double>(w[l]);
            if (single) {  // keep the weights for the means below
#pragma omp simd
              for (int64_t l = 0; l < L; ++l) d[q * L + l] = static_cast<double>(w[l]);
            }
          }
        }
        for (int64_t q = 0; q < squares; ++q) total[q] += lane_reduce(buf.lane_total.data() + q * L);
      }
      if (!means) continue;
      for (int64_t q = 0; q < squares; ++q) inv_total[q] = 1.0 / total[q];
      std::fill(buf.lane_acc.begin(), buf.lane_acc.end(), 0.0);
      for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
        double* d = buf.dist.data() + (single ? chunk * squares * L : 0);
        if (!single) chunk_distances(t, xb, g, s, chunk, d);  // against the final dmin of stage "totals"
        for (int64_t q = 0; q < squares; ++q) {
          double* normalized = sa.at(adjoint, q / cols, q % cols);
          if (single) {  // the fp32 weights kept above, exact in float64
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) normalized[l] = d[q * L + l] * inv_total[q];
          } else {
            float w[L];
            lane_weights(d + q * L, dmin[q], c, t.band, w);
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) normalized[l] = static_cast<double>(w[l]) * inv_total[q];
          }
        }
        box_sums(adjoint, sa, covering.data());  // [H, W]: the normalized weights of the covering squares
        for (int64_t p = 0; p < pixels; ++p) {
          const double* a = covering.data() + p * L;
          for (int64_t ch = 0; ch < channels; ++ch) {
            const float* yv = t.chunk_values(chunk, p) + ch * L;
            double* la = buf.lane_acc.data() + (p * channels + ch) * L;
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) la[l] += a[l] * static_cast<double>(yv[l]);
          }
        }
      }
      for (int64_t v = 0; v < pixels * channels; ++v)
        t.acc[b * pixels * channels + v] += lane_reduce(buf.lane_acc.data() + v * L);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// ELS by shifted box sums. For a query image x, a training image y and a shift s = p - q (key
// location minus query pixel), the distance of pixel q to the key at q + s is the box sum over q's
// window of e_s[p] = sum_ch (x[ch, p] - y[ch, p + s])^2. Zero padding (boundary-broken dictionaries):
// along each axis a border coordinate only takes shift 0 and an interior coordinate i the shifts
// that keep i + s interior, so every allowed (q, s) has its whole clipped window, shifted by s,
// inside the image: the padded entries are 0 for query and key alike and the box sum over the
// in-image part of the window is the distance. Per axis and shift the output coordinates form one
// range (shift 0: all of them; s != 0: the interior i with i + s interior) and the box sums need e_s
// on that range extended by r on each side. Circular: every shift, the whole image, wrapped (the
// circular BoxPlan of the LS path). Same error bound as the LS box path (all terms >= 0:
// gamma_{C - 1 + 2 (P - 1)}). Cost per (query image, training image, shift): about (C + 4) H W
// float64 operations, against C P^2 per key and shift for the direct path (translated_tile).
//
// Loop order per query image: chunk of kBoxLanes training images, row shift, column shift, output
// pixel. There is no tile-wide distance buffer: each pixel's 16 new distances are checked against
// its running best, and a lower one rescales the state (one exp) before the weights are taken, so
// that every weight is exp(-(d - dmin) c) <= 1 against the best distance seen so far. Weights and
// weighted value sums run in kBoxLanes lanes per pixel ([H*W, 1 + C, kBoxLanes] float64), reduced in
// one fixed order at the end of the tile: the same operations in the same order for a query image
// whatever the batch or the thread count.
struct ShiftRange {
  int64_t shift, out_lo, out_hi, in_lo, in_hi;  // output coordinates [out_lo, out_hi); e_s on [in_lo, in_hi)
  WindowAxis axis;                               // the window sums of that line (zero padding)
};

std::vector<ShiftRange> shift_ranges(int64_t n, int64_t patch, bool circular) {
  const int64_t r = patch / 2, interior = n - 2 * r;
  std::vector<ShiftRange> ranges;
  if (circular) {
    for (int64_t s = 0; s < n; ++s) ranges.push_back({s, 0, n, 0, n, WindowAxis{n, 0, n, patch, false}});
    return ranges;
  }
  const int64_t reach = std::max<int64_t>(0, interior - 1);
  for (int64_t s = -reach; s <= reach; ++s) {
    if (s == 0) {  // every coordinate: the border ones (their own) and the interior ones
      ranges.push_back({0, 0, n, 0, n, window_axis(n, r, n, patch)});
      continue;
    }
    const int64_t lo = std::max(r, r - s), hi = std::min(n - r, n - r - s);
    if (lo < hi) ranges.push_back({s, lo, hi, lo - r, hi + r, window_axis(hi - lo + 2 * r, 0, hi - lo, patch)});
  }
  return ranges;
}

void box_els_tile(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t valid,
                  int64_t channels, int64_t height, int64_t width, int64_t patch, bool circular,
                  std::uintptr_t inv2s2_ptr, double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr,
                  std::uintptr_t acc_ptr, int threads) {
  constexpr int64_t L = kBoxLanes;
  const BoxTile t = box_tile(x_ptr, y_ptr, batch, tile, valid, channels, height, width, patch, inv2s2_ptr, band,
                             dmin_ptr, total_ptr, acc_ptr);
  const int64_t pixels = t.pixels(), C = channels, W = width, H = height;
  const std::vector<ShiftRange> row_shifts = shift_ranges(height, patch, circular);
  const std::vector<ShiftRange> col_shifts = shift_ranges(width, patch, circular);
  const BoxPlan wrapped = box_plan(height, width, patch / 2, height, width, patch, true);
#pragma omp parallel num_threads(resolve_threads(threads))
  {
    std::vector<double> grid(circular ? 0 : pixels * L), mid(circular ? 0 : pixels * L), out(pixels * L);
    std::vector<double> prefix(circular ? 0 : pixels * L), suffix(circular ? 0 : pixels * L);
    std::vector<double> lane_total(pixels * L), lane_acc(pixels * C * L);
    BoxScratch wrap_scratch(circular ? wrapped : box_plan(1, 1, 0, 1, 1, 1, false));
    std::vector<int64_t> key_row(H), key_col(W);
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const double c = t.inv2s2[b];
      const float* xb = t.x + b * C * pixels;
      double* dmin = t.dmin + b * pixels;
      double* total = t.total + b * pixels;
      double* acc = t.acc + b * pixels * C;
      std::fill(lane_total.begin(), lane_total.end(), 0.0);
      std::fill(lane_acc.begin(), lane_acc.end(), 0.0);
      for (int64_t chunk = 0; chunk < t.chunks(); ++chunk) {
        const int64_t live = std::clamp<int64_t>(t.valid - chunk * L, 0, L);  // lanes holding real images
        const float* yc = t.chunk_values(chunk, 0);                       // [H*W, C, L]
        for (const ShiftRange& ra : row_shifts) {
          for (int64_t i = 0; i < H; ++i) key_row[i] = wrap(i + ra.shift, H);
          for (const ShiftRange& cb : col_shifts) {
            for (int64_t j = 0; j < W; ++j) key_col[j] = wrap(j + cb.shift, W);
            const int64_t orows = ra.out_hi - ra.out_lo, ocols = cb.out_hi - cb.out_lo;
            const int64_t in_cols = cb.in_hi - cb.in_lo;
            // (1) e_s on the input rectangle (its own grid, or the wrapped plan's)
            for (int64_t i = ra.in_lo; i < ra.in_hi; ++i) {
              for (int64_t j = cb.in_lo; j < cb.in_hi; ++j) {
                const int64_t p = i * W + j;
                const float* yp = yc + (key_row[i] * W + key_col[j]) * C * L;
                double* e = circular ? wrap_scratch.at(wrapped, i, j)
                                     : grid.data() + ((i - ra.in_lo) * in_cols + (j - cb.in_lo)) * L;
                pixel_squared_differences(xb + p, pixels, yp, C, e);
              }
            }
            // (2) the box sums: out [orows, ocols, L]
            if (circular) {
              box_sums(wrapped, wrap_scratch, out.data());
            } else {
              for (int64_t i = 0; i < ra.in_hi - ra.in_lo; ++i)
                window_line(grid.data() + i * in_cols * L, mid.data() + i * ocols * L, cb.axis, L, prefix.data(),
                            suffix.data());
              window_line(mid.data(), out.data(), ra.axis, ocols * L, prefix.data(), suffix.data());
            }
            if (live < L)  // the zero images that fill the last chunk: no key
              for (int64_t k = 0; k < orows * ocols; ++k)
                for (int64_t l = live; l < L; ++l) out[k * L + l] = kInfinity;
            // (3) per output pixel: a lower distance rescales the state, then weights and sums
            for (int64_t i = ra.out_lo; i < ra.out_hi; ++i) {
              for (int64_t j = cb.out_lo; j < cb.out_hi; ++j) {
                const int64_t q = i * W + j;
                const double* d = out.data() + ((i - ra.out_lo) * ocols + (j - cb.out_lo)) * L;
                double* lt = lane_total.data() + q * L;
                double* la = lane_acc.data() + q * C * L;
                double m = kInfinity;  // the 16 distances' minimum
#pragma omp simd reduction(min : m)
                for (int64_t l = 0; l < L; ++l) m = d[l] < m ? d[l] : m;
                const double scale = merge_min(m, c, dmin[q], total[q], acc + q * C, C);
                if (scale != 1.0) {  // the pixel's lanes too
                  for (int64_t l = 0; l < L; ++l) lt[l] *= scale;
                  for (int64_t l = 0; l < C * L; ++l) la[l] *= scale;
                }
                float w[L];
                lane_weights(d, dmin[q], c, t.band, w);
#pragma omp simd
                for (int64_t l = 0; l < L; ++l) lt[l] += static_cast<double>(w[l]);
                const float* yv = yc + (key_row[i] * W + key_col[j]) * C * L;  // the key's centre
                for (int64_t ch = 0; ch < C; ++ch) {
#pragma omp simd
                  for (int64_t l = 0; l < L; ++l)
                    la[ch * L + l] += static_cast<double>(w[l]) * static_cast<double>(yv[ch * L + l]);
                }
              }
            }
          }
        }
      }
      for (int64_t p = 0; p < pixels; ++p) {
        total[p] += lane_reduce(lane_total.data() + p * L);
        for (int64_t ch = 0; ch < C; ++ch) acc[p * C + ch] += lane_reduce(lane_acc.data() + (p * C + ch) * L);
      }
    }
  }
}

// CUDA entry points (local_denoise.cu): the same tiles and state as the CPU kernels, on device
// pointers (the els tile image-major, [T, C, H+P-1, W+P-1]). Python built the index arrays; they
// live on the device and are not re-checked here.
void translated_cuda(std::uintptr_t xq_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t channels,
                     int64_t height, int64_t width, int64_t patch, std::uintptr_t row_lo_ptr, std::uintptr_t row_hi_ptr,
                     std::uintptr_t col_lo_ptr, std::uintptr_t col_hi_ptr, std::uintptr_t inv2s2_ptr, double band,
                     std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr, int device,
                     std::uintptr_t stream) {
#ifdef DIFFCORE_WITH_CUDA
  check_translated(xq_ptr, y_ptr, row_lo_ptr, row_hi_ptr, col_lo_ptr, col_hi_ptr, inv2s2_ptr, dmin_ptr, total_ptr,
                   acc_ptr, batch, tile, channels, height, width, patch);
  local_denoise_translated_cuda(reinterpret_cast<const float*>(xq_ptr), reinterpret_cast<const float*>(y_ptr), batch,
                                tile, channels, height, width, patch, reinterpret_cast<const int32_t*>(row_lo_ptr),
                                reinterpret_cast<const int32_t*>(row_hi_ptr),
                                reinterpret_cast<const int32_t*>(col_lo_ptr),
                                reinterpret_cast<const int32_t*>(col_hi_ptr),
                                reinterpret_cast<const double*>(inv2s2_ptr), band,
                                reinterpret_cast<double*>(dmin_ptr), reinterpret_cast<double*>(total_ptr),
                                reinterpret_cast<double*>(acc_ptr), device, reinterpret_cast<void*>(stream));
#else
  (void)xq_ptr, (void)y_ptr, (void)batch, (void)tile, (void)channels, (void)height, (void)width, (void)patch;
  (void)row_lo_ptr, (void)row_hi_ptr, (void)col_lo_ptr, (void)col_hi_ptr, (void)inv2s2_ptr, (void)band;
  (void)dmin_ptr, (void)total_ptr, (void)acc_ptr, (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: local_denoise_translated_cuda: diffcore._C was built without CUDA");
#endif
}

void same_location_cuda(std::uintptr_t x_ptr, std::uintptr_t y_ptr, int64_t batch, int64_t tile, int64_t channels,
                        int64_t pixels, int64_t locations, std::uintptr_t support_offsets_ptr,
                        std::uintptr_t support_index_ptr, std::uintptr_t support_weight_ptr,
                        std::uintptr_t out_offsets_ptr, std::uintptr_t out_index_ptr, std::uintptr_t inv2s2_ptr,
                        double band, std::uintptr_t dmin_ptr, std::uintptr_t total_ptr, std::uintptr_t acc_ptr,
                        int device, std::uintptr_t stream) {
#ifdef DIFFCORE_WITH_CUDA
  check_same_location(x_ptr, y_ptr, support_offsets_ptr, support_index_ptr, support_weight_ptr, out_offsets_ptr,
                      out_index_ptr, inv2s2_ptr, dmin_ptr, total_ptr, acc_ptr, batch, tile, channels, pixels, locations);
  local_denoise_same_location_cuda(
      reinterpret_cast<const float*>(x_ptr), reinterpret_cast<const float*>(y_ptr), batch, tile, channels, pixels,
      locations, reinterpret_cast<const int64_t*>(support_offsets_ptr),
      reinterpret_cast<const int32_t*>(support_index_ptr), reinterpret_cast<const float*>(support_weight_ptr),
      reinterpret_cast<const int64_t*>(out_offsets_ptr), reinterpret_cast<const int32_t*>(out_index_ptr),
      reinterpret_cast<const double*>(inv2s2_ptr), band, reinterpret_cast<double*>(dmin_ptr),
      reinterpret_cast<double*>(total_ptr), reinterpret_cast<double*>(acc_ptr), device,
      reinterpret_cast<void*>(stream));
#else
  (void)x_ptr, (void)y_ptr, (void)batch, (void)tile, (void)channels, (void)pixels, (void)locations;
  (void)support_offsets_ptr, (void)support_index_ptr, (void)support_weight_ptr, (void)out_offsets_ptr;
  (void)out_index_ptr, (void)inv2s2_ptr, (void)band, (void)dmin_ptr, (void)total_ptr, (void)acc_ptr;
  (void)device, (void)stream;
  throw std::runtime_error("diffcore._C: local_denoise_same_location_cuda: diffcore._C was built without CUDA");
#endif
}

void register_local_denoise(py::module_& m) {
  // The keyword runs the kernels share, each spelled once; a kernel's keywords are its runs joined.
  const auto training_tile = keywords("y_ptr", "batch", "tile");
  const auto grid = keywords("channels", "height", "width", "patch");
  const auto key_ranges = keywords("row_lo_ptr", "row_hi_ptr", "col_lo_ptr", "col_hi_ptr");
  const auto same_location = std::tuple_cat(
      keywords("x_ptr"), training_tile,
      keywords("channels", "pixels", "locations", "support_offsets_ptr", "support_index_ptr", "support_weight_ptr",
               "out_offsets_ptr", "out_index_ptr"));
  const auto box_tile = std::tuple_cat(keywords("x_ptr"), training_tile, keywords("valid"), grid);
  const auto running_state = keywords("inv2s2_ptr", "band", "dmin_ptr", "total_ptr", "acc_ptr");
  const auto on_cpu = keywords("threads");
  const auto on_cuda = keywords("device", "stream");
  def_keyword_only(
      m, "local_denoise_translated_tile", &translated_tile,
      std::tuple_cat(keywords("xq_ptr"), training_tile, keywords("valid"), grid, key_ranges, running_state, on_cpu),
      "ELS over one tile: padded queries [B, C, H+P-1, W+P-1] and padded training images, image-innermost "
      "[C, H+P-1, W+P-1, T] (float32, T a multiple of 16, the first `valid` images real); key ranges per "
      "row/column (int32 [H], [W]); running state dmin/total [B*H*W], acc [B*H*W, C] (float64) updated in place.");
  def_keyword_only(
      m, "local_denoise_same_location_tile", &same_location_tile, std::tuple_cat(same_location, running_state, on_cpu),
      "Same-location keys over one tile: x [B, C, H*W], training tile pixel-major [H*W, C, T] (float32); per "
      "location a weighted pixel support and output pixels (CSR: int64 offsets, int32 indices, float32 "
      "weights); running state dmin/total [B*L], acc [B, outputs, C] (float64) updated in place.");
  def_keyword_only(
      m, "local_denoise_box_ls_tile", &box_ls_tile,
      std::tuple_cat(box_tile, keywords("circular"), running_state, on_cpu),
      "LS by box sums over one tile: x [B, C, H*W], training tile chunk-major [T/16, H*W, C, 16] (float32, T a "
      "multiple of 16, the first `valid` images real, the rest zero); zero or circular padding; running state "
      "dmin/total [B*H*W], acc [B, H*W, C] (float64) updated in place.");
  def_keyword_only(
      m, "local_denoise_box_els_tile", &box_els_tile,
      std::tuple_cat(box_tile, keywords("circular"), running_state, on_cpu),
      "ELS by shifted box sums over one tile (layout as local_denoise_box_ls_tile): zero padding with the "
      "boundary-broken dictionaries, or circular; running state dmin/total [B*H*W], acc [B, H*W, C] (float64) "
      "updated in place.");
  def_keyword_only(
      m, "local_denoise_box_pspc_tile", &box_pspc_tile,
      std::tuple_cat(box_tile, keywords("stage"), running_state, on_cpu),
      "PSPC by box sums over one tile (layout as local_denoise_box_ls_tile): stage 'totals' updates the "
      "squares' dmin/total [B*S] (S valid squares, row-major); 'means' adds to acc [B, H*W, C] the sums over "
      "the tile of the covering squares' normalized weights times the pixel values, with the final "
      "dmin/total; 'single' (the tile is the whole training set, fresh state) does both.");
  def_keyword_only(m, "local_denoise_translated_cuda", &translated_cuda,
                   std::tuple_cat(keywords("xq_ptr"), training_tile, grid, key_ranges, running_state, on_cuda),
                   "CUDA ELS over one image-major tile [T, C, H+P-1, W+P-1] (compiled, never run on a GPU).");
  def_keyword_only(m, "local_denoise_same_location_cuda", &same_location_cuda,
                   std::tuple_cat(same_location, running_state, on_cuda),
                   "CUDA same-location kinds over one tile (compiled, never run on a GPU).");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(local_denoise, diffcore::register_local_denoise);
