// Class conditioning and classifier-free guidance on the device: the per-sample table-row gather of
// a class-conditional model (rows per (step, condition), chosen per sample) and the CFG combine of
// the doubled forward's two halves, with diffusers' rescale_noise_cfg. The per-element arithmetic
// is kernels/cfg.h, which the CPU sampler runs too. Layout: each sample's e values contiguous
// (NHWC within a sample; the combine is elementwise and the standard deviation order-free).
// Reductions: per thread sequential in double, then a shared-memory tree over the block (256
// threads), two passes (means, then squared deviations), as the CPU's two-pass std in double.
#include "cuda/check.hpp"
#include "kernels/cfg.h"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {
namespace {

constexpr unsigned kThreads = 256;

template <class T>
__global__ void gather_rows_indexed_kernel(const T* __restrict__ table, const int* __restrict__ rows, int stride,
                                           const int* __restrict__ step_index, T* __restrict__ y, int n, int c) {
  const int* step_rows = rows + std::size_t(*step_index) * std::size_t(stride);
  const std::size_t total = std::size_t(n) * std::size_t(c);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = i / std::size_t(c), ch = i % std::size_t(c);
    y[i] = table[std::size_t(step_rows[b]) * std::size_t(c) + ch];
  }
}

// Sums v over the block (blockDim.x == kThreads); every thread gets the total. red: kThreads doubles.
__device__ double block_sum_f64(double v, double* red) {
  red[threadIdx.x] = v;
  __syncthreads();
  for (unsigned half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
    __syncthreads();
  }
  const double total = red[0];
  __syncthreads();  // red is reused by the next call
  return total;
}

template <class T>
__global__ void cfg_combine_kernel(T* __restrict__ out, int n, std::size_t e, float w, float phi) {
  __shared__ double red[kThreads];
  T* cond = out + std::size_t(blockIdx.x) * e;
  const T* uncond = out + (std::size_t(n) + blockIdx.x) * e;
  if (phi == 0.0f) {
    for (std::size_t i = threadIdx.x; i < e; i += blockDim.x) cond[i] = from_f32<T>(ddim::cfg_combine(to_f32(uncond[i]), to_f32(cond[i]), w));
    return;
  }
  double sc = 0, sg = 0;
  for (std::size_t i = threadIdx.x; i < e; i += blockDim.x) {
    const float c = to_f32(cond[i]);
    sc += c;
    sg += ddim::cfg_combine(to_f32(uncond[i]), c, w);
  }
  const double mc = block_sum_f64(sc, red) / double(e);
  const double mg = block_sum_f64(sg, red) / double(e);
  double vc = 0, vg = 0;
  for (std::size_t i = threadIdx.x; i < e; i += blockDim.x) {
    const float c = to_f32(cond[i]);
    const double dc = c - mc, dg = ddim::cfg_combine(to_f32(uncond[i]), c, w) - mg;
    vc += dc * dc;
    vg += dg * dg;
  }
  vc = block_sum_f64(vc, red);  // its barriers also order every read of cond above before the writes below
  vg = block_sum_f64(vg, red);
  float ratio = 1.0f;
  if (e >= 2) {
    const float std_c = float(sqrt(vc / double(e - 1))), std_g = float(sqrt(vg / double(e - 1)));
    if (std_g > 0.0f) ratio = std_c / std_g;
  }
  for (std::size_t i = threadIdx.x; i < e; i += blockDim.x)
    cond[i] = from_f32<T>(ddim::cfg_rescale(ddim::cfg_combine(to_f32(uncond[i]), to_f32(cond[i]), w), ratio, phi));
}

}  // namespace

void gather_rows_indexed(const void* table, const int* rows, int stride, const int* step_index, void* y, DType t, int n,
                         int c, cudaStream_t stream) {
  const std::size_t total = std::size_t(n) * std::size_t(c);
  if (total == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, gather_rows_indexed_kernel<T>)(
        static_cast<const T*>(table), rows, stride, step_index, static_cast<T*>(y), n, c);
  });
  check_launch("gather_rows_indexed");
}

void cfg_combine(void* out, DType t, int n, std::size_t e, float scale, float rescale, cudaStream_t stream) {
  if (n == 0 || e == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(unsigned(n), kThreads, 0, stream, cfg_combine_kernel<T>)(static_cast<T*>(out), n, e, scale, rescale);
  });
  check_launch("cfg_combine");
}

void load_guidance_kernels(DType t) {
  cudaFuncAttributes attr{};
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, gather_rows_indexed_kernel<T>));
    DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, cfg_combine_kernel<T>));
  });
}

}  // namespace ddim::cuda
