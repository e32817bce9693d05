// Vector quantisation (VQModel's codebook lookup), NHWC: one thread per latent pixel finds the
// codebook entry nearest to it (kernels/vector_quantize.h: squared distances as one chain over the
// channels, every operation rounded once, ties to the lowest index, exactly the CPU's arithmetic)
// and writes that entry, rounded once to the element type.
//
// Layout: x, y (n, hw, c) of type T (y may be x: a thread reads its pixel before writing it);
// codebook (entries, c) fp32; indices (n, hw) int32 or null. The pixel's c values are converted
// to fp32 into registers first, so c <= kMaxVqChannels (latent widths are 3 to 16; a wider latent
// is Unsupported and `--device auto` falls back to the CPU). Every thread of a warp reads the same
// codebook entry at the same time (a broadcast load, cached): the codebook is read once per warp.
// Launch: 256 threads, a grid-stride loop over the n * hw pixels.
#include <cstddef>
#include <string>

#include "cuda/check.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"
#include "kernels/vector_quantize.h"

namespace ddim::cuda {

namespace {

constexpr int kVqThreads = 256;

template <class T>
__global__ void vector_quantize_kernel(const T* x, T* y, int* indices, const float* __restrict__ codebook, int entries, int c,
                                       std::size_t pixels) {
  for (std::size_t p = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; p < pixels;
       p += std::size_t(gridDim.x) * blockDim.x) {
    float z[kMaxVqChannels];
    for (int ch = 0; ch < c; ++ch) z[ch] = to_f32(x[p * std::size_t(c) + std::size_t(ch)]);
    const int k = vq_nearest_index(z, 1, codebook, entries, c);
    for (int ch = 0; ch < c; ++ch) y[p * std::size_t(c) + std::size_t(ch)] = from_f32<T>(codebook[std::size_t(k) * c + ch]);
    if (indices) indices[p] = k;
  }
}

}  // namespace

void vector_quantize(const void* x, void* y, int* indices, DType t, int n, int hw, int c, const float* codebook, int entries,
                     cudaStream_t stream) {
  const auto bad = [](const std::string& what) { throw Error(ErrorCode::InvalidArgument, "cuda vector_quantize: " + what); };
  if (n < 0 || hw < 0) bad("n and hw must be >= 0");
  if (c < 1 || entries < 1) bad("c and entries must be >= 1 (got c=" + std::to_string(c) + ", entries=" + std::to_string(entries) + ")");
  if (c > kMaxVqChannels)
    throw Error(ErrorCode::Unsupported, "cuda vector_quantize: " + std::to_string(c) + " latent channels; the kernel takes at most " +
                                            std::to_string(kMaxVqChannels));
  const std::size_t pixels = std::size_t(n) * std::size_t(hw);
  if (pixels == 0) return;
  if (!x || !y || !codebook) bad("x, y and codebook must not be null");
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(grid_for(pixels, kVqThreads), kVqThreads, 0, stream, vector_quantize_kernel<T>)(
        static_cast<const T*>(x), static_cast<T*>(y), indices, codebook, entries, c, pixels);
  });
  check_launch("vector_quantize");
}

}  // namespace ddim::cuda
