// CUDA local denoisers: one thread per query, exact float64 distances, the running log-sum-exp state
// of the CPU kernels (local_denoise.cpp) in global memory. Kept simple and exact rather than fast;
// compiled, never run on a GPU.
//
// Each key k of a query folds in as: if d_k < dmin, rescale total and acc by exp(-(dmin - d_k) c) and
// set dmin = d_k; then w = exp(-(d_k - dmin) c) (0 beyond the band), total += w, acc += w value(k).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/cuda_utils.h"
#include "local_denoise/local_denoise_cuda.h"

namespace diffcore {
namespace {

constexpr int kThreads = 128;

__device__ inline double fold_key(double d, double c, double band, double& dmin, double& total, double* acc,
                                  int64_t values) {
  if (d < dmin) {
    const double scale = isinf(dmin) ? 0.0 : exp(-(dmin - d) * c);
    total *= scale;
    for (int64_t v = 0; v < values; ++v) acc[v] *= scale;
    dmin = d;
  }
  const double t = (d - dmin) * c;
  const double w = t > band ? 0.0 : exp(-t);
  total += w;
  return w;
}

__global__ void translated_kernel(const float* __restrict__ xq, const float* __restrict__ y, int64_t batch,
                                  int64_t tile, int64_t channels, int64_t height, int64_t width, int64_t patch,
                                  const int32_t* __restrict__ row_lo, const int32_t* __restrict__ row_hi,
                                  const int32_t* __restrict__ col_lo, const int32_t* __restrict__ col_hi,
                                  const double* __restrict__ inv2s2, double band, double* __restrict__ dmin,
                                  double* __restrict__ total, double* __restrict__ acc) {
  const int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t pixels = height * width;
  if (qi >= batch * pixels) return;
  const int64_t b = qi / pixels, i = (qi % pixels) / width, j = qi % width;
  const int64_t ph = height + patch - 1, pw = width + patch - 1, r = patch / 2, image = channels * ph * pw;
  const double c = inv2s2[b];
  double m = dmin[qi], s = total[qi];
  double* a = acc + qi * channels;
  const float* xb = xq + b * image;
  for (int64_t n = 0; n < tile; ++n) {
    const float* yn = y + n * image;
    for (int32_t kr = row_lo[i]; kr < row_hi[i]; ++kr) {
      for (int32_t kc = col_lo[j]; kc < col_hi[j]; ++kc) {
        double d = 0.0;
        for (int64_t ch = 0; ch < channels; ++ch)
          for (int64_t di = 0; di < patch; ++di)
            for (int64_t dj = 0; dj < patch; ++dj) {
              const double diff = static_cast<double>(xb[(ch * ph + i + di) * pw + j + dj]) -
                                  static_cast<double>(yn[(ch * ph + kr + di) * pw + kc + dj]);
              d += diff * diff;
            }
        const double w = fold_key(d, c, band, m, s, a, channels);
        if (w != 0.0)
          for (int64_t ch = 0; ch < channels; ++ch) a[ch] += w * yn[(ch * ph + kr + r) * pw + kc + r];
      }
    }
  }
  dmin[qi] = m;
  total[qi] = s;
}

__global__ void same_location_kernel(const float* __restrict__ x, const float* __restrict__ y, int64_t batch,
                                     int64_t tile, int64_t channels, int64_t pixels, int64_t locations,
                                     const int64_t* __restrict__ sup_off, const int32_t* __restrict__ sup_idx,
                                     const float* __restrict__ sup_w, const int64_t* __restrict__ out_off,
                                     const int32_t* __restrict__ out_idx, const double* __restrict__ inv2s2,
                                     double band, double* __restrict__ dmin, double* __restrict__ total,
                                     double* __restrict__ acc) {
  const int64_t qi = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (qi >= batch * locations) return;
  const int64_t b = qi / locations, q = qi % locations;
  const double c = inv2s2[b];
  double m = dmin[qi], s = total[qi];
  double* a = acc + (b * out_off[locations] + out_off[q]) * channels;
  const int64_t values = (out_off[q + 1] - out_off[q]) * channels;
  for (int64_t n = 0; n < tile; ++n) {
    double d = 0.0;
    for (int64_t k = sup_off[q]; k < sup_off[q + 1]; ++k)
      for (int64_t ch = 0; ch < channels; ++ch) {
        const double diff = static_cast<double>(x[(b * channels + ch) * pixels + sup_idx[k]]) -
                            static_cast<double>(y[(static_cast<int64_t>(sup_idx[k]) * channels + ch) * tile + n]);
        d += static_cast<double>(sup_w[k]) * diff * diff;
      }
    const double w = fold_key(d, c, band, m, s, a, values);
    if (w != 0.0)
      for (int64_t o = out_off[q]; o < out_off[q + 1]; ++o)
        for (int64_t ch = 0; ch < channels; ++ch)
          a[(o - out_off[q]) * channels + ch] += w * y[(static_cast<int64_t>(out_idx[o]) * channels + ch) * tile + n];
  }
  dmin[qi] = m;
  total[qi] = s;
}

unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace

void local_denoise_translated_cuda(const float* xq, const float* y, int64_t batch, int64_t tile, int64_t channels,
                                   int64_t height, int64_t width, int64_t patch, const int32_t* row_lo,
                                   const int32_t* row_hi, const int32_t* col_lo, const int32_t* col_hi,
                                   const double* inv2s2, double band, double* dmin, double* total, double* acc,
                                   int device, void* stream) {
  CudaDeviceGuard guard(device);
  translated_kernel<<<blocks_for(batch * height * width), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      xq, y, batch, tile, channels, height, width, patch, row_lo, row_hi, col_lo, col_hi, inv2s2, band, dmin, total,
      acc);
  check_cuda_launch("local_denoise translated_kernel");
}

void local_denoise_same_location_cuda(const float* x, const float* y, int64_t batch, int64_t tile, int64_t channels,
                                      int64_t pixels, int64_t locations, const int64_t* support_offsets,
                                      const int32_t* support_index, const float* support_weight,
                                      const int64_t* out_offsets, const int32_t* out_index, const double* inv2s2,
                                      double band, double* dmin, double* total, double* acc, int device,
                                      void* stream) {
  CudaDeviceGuard guard(device);
  same_location_kernel<<<blocks_for(batch * locations), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, y, batch, tile, channels, pixels, locations, support_offsets, support_index, support_weight, out_offsets,
      out_index, inv2s2, band, dmin, total, acc);
  check_cuda_launch("local_denoise same_location_kernel");
}

}  // namespace diffcore
