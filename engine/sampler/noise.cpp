#include "sampler/noise.hpp"

#include <cstddef>

#include "kernels/philox.h"

namespace ddim {

void fill_normal(std::uint64_t seed, std::uint32_t stream, std::uint32_t step, std::span<float> out) {
  const std::size_t n = out.size();
  for (std::size_t base = 0; base < n; base += 4) {
    const Normal4 z = philox_normal4(seed, stream, step, static_cast<std::uint64_t>(base / 4));
    const std::size_t count = n - base < 4 ? n - base : 4;
    for (std::size_t j = 0; j < count; ++j) out[base + j] = z.v[j];
  }
}

}  // namespace ddim
