// The sampler's per-step kernels: initial Philox noise, the DDIM / DDPM update (the shared
// per-element math of kernels/ddim_step.h and kernels/ddpm_step.h), the device step counter and
// the time-table row gather. One thread per element of the (n, hw, c) state; noise is indexed by
// the host's NCHW element index so every value equals the CPU's.
#include <cstring>

#include "cuda/check.hpp"
#include "cuda/threshold.hpp"
#include "kernels/ddpm_step.h"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"
#include "kernels/philox.h"

namespace ddim::cuda {
namespace {

constexpr unsigned kThreads = 256;

__global__ void philox_initial_kernel(const std::uint64_t* __restrict__ seeds, int n, int c, int hw,
                                      float* __restrict__ x) {
  const std::size_t per = std::size_t(c) * std::size_t(hw), total = std::size_t(n) * per;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t b = i / per, r = i % per;  // r = p * c + ch (NHWC within the sample)
    const std::size_t p = r / std::size_t(c), ch = r % std::size_t(c);
    x[i] = philox_normal(seeds[b], kNoiseStreamInitial, 0, ch * std::size_t(hw) + p);
  }
}

template <class T>
__global__ void ddim_step_kernel(StepLaunch s) {
  const int step = *s.step_index;
  const DdimStepParams p = s.params[step];
  const T* __restrict__ out = static_cast<const T*>(s.out);
  T* __restrict__ next = static_cast<T*>(s.next_input);
  const std::size_t per = std::size_t(s.c) * std::size_t(s.hw), total = std::size_t(s.n) * per;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x) {
    const float x = s.x[i], o = to_f32(out[i]);
    const float threshold = s.thresholds ? s.thresholds[i / per] : 1.f;
    const float x0 = ddim_clip_x0(ddim_pred_x0(x, o, p), p, threshold);
    float z = 0.f;
    if (p.sigma > 0.f) {
      const std::size_t b = i / per, r = i % per;
      const std::size_t e = (r % std::size_t(s.c)) * std::size_t(s.hw) + r / std::size_t(s.c);  // NCHW index
      z = s.noise ? s.noise[(std::size_t(step) * std::size_t(s.n) + b) * per + e]
                  : philox_normal(s.seeds[b], kNoiseStreamStep, std::uint32_t(step), e);
    }
    const float prev = step_prev_sample(x, o, x0, z, p);
    s.x[i] = prev;
    if (s.x0_all) s.x0_all[std::size_t(step) * total + i] = x0;
    if (s.trajectory) s.trajectory[std::size_t(step + 1) * total + i] = prev;
    if (next) next[i] = from_f32<T>(prev);
  }
}

template <class T>
__global__ void pred_x0_kernel(StepLaunch s, float* __restrict__ x0) {
  const DdimStepParams p = s.params[*s.step_index];
  const T* __restrict__ out = static_cast<const T*>(s.out);
  const std::size_t total = std::size_t(s.n) * std::size_t(s.c) * std::size_t(s.hw);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x)
    x0[i] = ddim_pred_x0(s.x[i], to_f32(out[i]), p);
}

__global__ void advance_step_kernel(int* step_index) { *step_index += 1; }

// One chunk of host bytes, passed by value (kernel parameter space).
struct InlineBytes {
  unsigned char b[kInlineCopyBytes];
};
__global__ void inline_copy_kernel(unsigned char* __restrict__ dst, InlineBytes src, unsigned n) {
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src.b[i];
}

template <class T>
__global__ void bias_divide_kernel(T* __restrict__ y, std::size_t rows, int cols, const float* __restrict__ bias, float divisor) {
  const std::size_t total = rows * std::size_t(cols);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x) {
    float v = to_f32(y[i]);
    if (bias) v += bias[i % std::size_t(cols)];
    y[i] = from_f32<T>(v / divisor);
  }
}

template <class T>
__global__ void gather_rows_kernel(const T* __restrict__ table, const int* __restrict__ step_index, T* __restrict__ y,
                                   int n, int c) {
  const T* row = table + std::size_t(*step_index) * std::size_t(c);
  const std::size_t total = std::size_t(n) * std::size_t(c);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total; i += std::size_t(gridDim.x) * blockDim.x)
    y[i] = row[i % std::size_t(c)];
}

}  // namespace

void philox_initial(const std::uint64_t* seeds, int n, int c, int hw, float* x, cudaStream_t stream) {
  const std::size_t total = std::size_t(n) * std::size_t(c) * std::size_t(hw);
  if (total == 0) return;
  DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, philox_initial_kernel)(seeds, n, c, hw, x);
  check_launch("philox_initial");
}

void ddim_step(const StepLaunch& s, DType t, cudaStream_t stream) {
  const std::size_t total = std::size_t(s.n) * std::size_t(s.c) * std::size_t(s.hw);
  if (total == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, ddim_step_kernel<T>)(s);
  });
  check_launch("ddim_step");
}

void ddim_pred_x0_all(const StepLaunch& s, DType t, float* x0, cudaStream_t stream) {
  const std::size_t total = std::size_t(s.n) * std::size_t(s.c) * std::size_t(s.hw);
  if (total == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, pred_x0_kernel<T>)(s, x0);
  });
  check_launch("ddim_pred_x0_all");
}

void load_sampling_kernels(DType t) {
  cudaFuncAttributes attr{};
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, gather_rows_kernel<T>));
    DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, ddim_step_kernel<T>));
    DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, pred_x0_kernel<T>));
  });
  DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, advance_step_kernel));
  DDIM_CUDA_CHECK(cudaFuncGetAttributes(&attr, inline_copy_kernel));
  load_threshold_kernels();
  load_guidance_kernels(t);
}

void copy_from_host_inline(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  if (!dst || !src) throw Error(ErrorCode::InvalidArgument, "copy_from_host_inline: null pointer");
  auto* d = static_cast<unsigned char*>(dst);
  const auto* h = static_cast<const unsigned char*>(src);
  for (std::size_t off = 0; off < bytes; off += kInlineCopyBytes) {
    const std::size_t n = bytes - off < kInlineCopyBytes ? bytes - off : kInlineCopyBytes;
    InlineBytes chunk;
    std::memcpy(chunk.b, h + off, n);
    DDIM_LAUNCH(1, 256, 0, stream, inline_copy_kernel)(d + off, chunk, unsigned(n));
    check_launch("copy_from_host_inline");
  }
}

void advance_step(int* step_index, cudaStream_t stream) {
  DDIM_LAUNCH(1, 1, 0, stream, advance_step_kernel)(step_index);
  check_launch("advance_step");
}

void bias_divide_rows(void* y, DType t, std::size_t rows, int cols, const float* bias, float divisor, cudaStream_t stream) {
  const std::size_t total = rows * std::size_t(cols);
  if (total == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, bias_divide_kernel<T>)(static_cast<T*>(y), rows, cols, bias, divisor);
  });
  check_launch("bias_divide_rows");
}

void gather_rows(const void* table, const int* step_index, void* y, DType t, int n, int c, cudaStream_t stream) {
  const std::size_t total = std::size_t(n) * std::size_t(c);
  if (total == 0) return;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, gather_rows_kernel<T>)(static_cast<const T*>(table), step_index,
                                                                              static_cast<T*>(y), n, c);
  });
  check_launch("gather_rows");
}

}  // namespace ddim::cuda
