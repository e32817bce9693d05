#pragma once
// Host helpers of class conditioning and classifier-free guidance (backend.hpp: Conditioning):
// the distinct conditions of a call (the rows of the folded tables) and the CFG combine.
#include <cstddef>
#include <vector>

#include "backend.hpp"

namespace ddim {

// The distinct conditions of a call, in order of first appearance (the conditional labels, then
// the null condition when guided), compared bit for bit. An unconditional call has one empty
// condition (count 1).
struct ConditionRows {
  std::vector<float> conditions;  // (count, width)
  std::vector<int> of_sample;     // per sample: its condition's index
  int null_index = -1;            // the null condition's index (guided calls)
  std::size_t count = 1;
};
ConditionRows distinct_conditions(const Conditioning& c, std::size_t batch);

// out (N, E) = the guided model output from out2 (2N, E): the conditional half first, the null
// half second; with rescale > 0 diffusers' rescale_noise_cfg per sample (kernels/cfg.h). When a
// sample's guided output has zero spread (or E < 2), the rescale ratio is taken as 1.
void combine_guidance(const float* out2, std::size_t batch, std::size_t elements, double scale, double rescale, float* out);

}  // namespace ddim
