// The convolution epilogue, for convolutions whose epilogue cuDNN did not fuse (and after the
// direct convolution): in place on y (n, hw, k) NHWC,
//   y[b, p, ch] = round_t(float(y[b, p, ch]) + bias[ch] + float(temb[b, ch]) + float(residual[b, p, ch]))
// adding in fp32 in exactly that order (absent terms skipped), one pass, rounded once to the
// element type. One thread per element, grid-stride, size_t indices. y may not alias temb; it may
// be the same buffer as residual (each element is read before it is written by the same thread).
#include "cuda/check.hpp"
#include "cuda/cudnn_conv.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {
namespace {

constexpr unsigned kThreads = 256;

// y, residual: (n, hw, k) of T; temb: (n, k) of T; bias: (k) fp32. Null pointers are skipped.
template <class T>
__global__ void conv_epilogue_kernel(T* y, std::size_t total, std::size_t per_sample, int k,
                                     const float* __restrict__ bias, const T* __restrict__ temb, const T* residual) {
  const std::size_t kk = static_cast<std::size_t>(k);
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < total;
       i += std::size_t(gridDim.x) * blockDim.x) {
    const std::size_t ch = i % kk;
    float v = to_f32(y[i]);
    if (bias) v += bias[ch];
    if (temb) v += to_f32(temb[(i / per_sample) * kk + ch]);
    if (residual) v += to_f32(residual[i]);
    y[i] = from_f32<T>(v);
  }
}

}  // namespace

void conv_epilogue(void* y, DType t, int n, int hw, int k, const float* bias, const void* temb, const void* residual,
                   cudaStream_t stream) {
  if (!bias && !temb && !residual) return;
  if (n < 0 || hw < 0 || k < 0)
    throw Error(ErrorCode::InvalidArgument, "conv_epilogue: negative dimension (n " + std::to_string(n) + ", hw " +
                                                std::to_string(hw) + ", k " + std::to_string(k) + ")");
  const std::size_t per_sample = std::size_t(hw) * std::size_t(k), total = std::size_t(n) * per_sample;
  if (total == 0) return;
  if (!y) throw Error(ErrorCode::InvalidArgument, "conv_epilogue: null y");
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(total, kThreads), kThreads, 0, stream, conv_epilogue_kernel<T>)(
        static_cast<T*>(y), total, per_sample, k, bias, static_cast<const T*>(temb), static_cast<const T*>(residual));
  });
  check_launch("conv_epilogue");
}

}  // namespace ddim::cuda
