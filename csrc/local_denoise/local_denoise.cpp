// Analytic local denoisers (ELS, LS, PSPC, masked same-location), CPU part: one training tile at a
// time, fused distances + streamed log-sum-exp + weighted sums, never materializing the keys.
//
// The Python side (diffcore/ops/_local_denoise_cpu.py) decodes and pads one tile of training images
// at a time and calls one of the two kernels below for it; the per-query running state
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
// - same_location_tile (ls, pspc, mask): the query of location q is a weighted list of pixels
//   (support, weights: query precisions); the keys are the same pixels of each training image; the
//   values are the pixels out_index[q] of the training image (C values each). Vectorized over the
//   training images (the tile is passed pixel-major, [H*W, C, T]).
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
#include <stdexcept>
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
  if (block_min < dmin) {
    const double scale = std::isinf(dmin) ? 0.0 : std::exp(-(dmin - block_min) * c);
    total *= scale;
    for (int64_t v = 0; v < values; ++v) acc[v] *= scale;
    dmin = block_min;
  }
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
  using py::arg;
  auto release = py::call_guard<py::gil_scoped_release>();
  const auto named = py::kw_only();
  m.def("local_denoise_translated_tile", &translated_tile, release, named, arg("xq_ptr"), arg("y_ptr"), arg("batch"),
        arg("tile"), arg("valid"), arg("channels"), arg("height"), arg("width"), arg("patch"), arg("row_lo_ptr"), arg("row_hi_ptr"),
        arg("col_lo_ptr"), arg("col_hi_ptr"), arg("inv2s2_ptr"), arg("band"), arg("dmin_ptr"), arg("total_ptr"),
        arg("acc_ptr"), arg("threads"),
        "ELS over one tile: padded queries [B, C, H+P-1, W+P-1] and padded training images, image-innermost "
        "[C, H+P-1, W+P-1, T] (float32, T a multiple of 16, the first `valid` images real); key ranges per row/column (int32 [H], [W]); running state dmin/total [B*H*W], acc [B*H*W, C] "
        "(float64) updated in place.");
  m.def("local_denoise_same_location_tile", &same_location_tile, release, named, arg("x_ptr"), arg("y_ptr"),
        arg("batch"), arg("tile"), arg("channels"), arg("pixels"), arg("locations"), arg("support_offsets_ptr"),
        arg("support_index_ptr"), arg("support_weight_ptr"), arg("out_offsets_ptr"), arg("out_index_ptr"),
        arg("inv2s2_ptr"), arg("band"), arg("dmin_ptr"), arg("total_ptr"), arg("acc_ptr"), arg("threads"),
        "Same-location keys over one tile: x [B, C, H*W], training tile pixel-major [H*W, C, T] (float32); per "
        "location a weighted pixel support and output pixels (CSR: int64 offsets, int32 indices, float32 "
        "weights); running state dmin/total [B*L], acc [B, outputs, C] (float64) updated in place.");
  m.def("local_denoise_translated_cuda", &translated_cuda, release, named, arg("xq_ptr"), arg("y_ptr"), arg("batch"),
        arg("tile"), arg("channels"), arg("height"), arg("width"), arg("patch"), arg("row_lo_ptr"), arg("row_hi_ptr"),
        arg("col_lo_ptr"), arg("col_hi_ptr"), arg("inv2s2_ptr"), arg("band"), arg("dmin_ptr"), arg("total_ptr"),
        arg("acc_ptr"), arg("device"), arg("stream"),
        "CUDA ELS over one image-major tile [T, C, H+P-1, W+P-1] (compiled, never run on a GPU).");
  m.def("local_denoise_same_location_cuda", &same_location_cuda, release, named, arg("x_ptr"), arg("y_ptr"),
        arg("batch"), arg("tile"), arg("channels"), arg("pixels"), arg("locations"), arg("support_offsets_ptr"),
        arg("support_index_ptr"), arg("support_weight_ptr"), arg("out_offsets_ptr"), arg("out_index_ptr"),
        arg("inv2s2_ptr"), arg("band"), arg("dmin_ptr"), arg("total_ptr"), arg("acc_ptr"), arg("device"),
        arg("stream"), "CUDA same-location kinds over one tile (compiled, never run on a GPU).");
}

}  // namespace
}  // namespace diffcore

DIFFCORE_REGISTER(local_denoise, diffcore::register_local_denoise);
