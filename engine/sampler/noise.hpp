#pragma once
// Host-side Philox normal noise (kernels/philox.h): the same values the CUDA kernels produce.
#include <cstdint>
#include <span>

namespace ddim {

// out[i] = philox_normal(seed, stream, step, i) for every i, computed one Philox block at a time.
// stream: kNoiseStreamInitial (x_T, step 0) or kNoiseStreamStep (per-step noise, step index).
void fill_normal(std::uint64_t seed, std::uint32_t stream, std::uint32_t step, std::span<float> out);

}  // namespace ddim
