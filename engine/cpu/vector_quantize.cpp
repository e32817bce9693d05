// Vector quantisation (VQModel's codebook lookup) on the CPU: NCHW, the per-pixel math of
// kernels/vector_quantize.h, pixels split over the pool (each pixel is independent, so the result
// never depends on the batch or the thread count).
#include <algorithm>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"
#include "kernels/vector_quantize.h"

namespace ddim::cpu {

void vector_quantize(const float* x, int n, int c, int hw, const float* codebook, int entries, float* y, int* indices,
                     ThreadPool* pool) {
  if (n < 0 || c <= 0 || hw < 0 || entries <= 0 || !codebook)
    throw Error(ErrorCode::InvalidArgument, "cpu vector_quantize: bad shape (c=" + std::to_string(c) +
                                                " hw=" + std::to_string(hw) + " entries=" + std::to_string(entries) + ")");
  const std::int64_t pixels = std::int64_t(n) * hw;
  parallel_for(pool, pixels, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const std::int64_t b = p / hw, i = p % hw;
      const float* z = x + b * std::int64_t(c) * hw + i;
      const int k = vq_nearest_index(z, hw, codebook, entries, c);
      if (indices) indices[p] = k;
      float* out = y + b * std::int64_t(c) * hw + i;
      for (int ch = 0; ch < c; ++ch) out[std::int64_t(ch) * hw] = codebook[std::int64_t(k) * c + ch];
    }
  });
}

}  // namespace ddim::cpu
