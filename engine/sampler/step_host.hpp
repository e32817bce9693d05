#pragma once
// One DDIM step of one sample on the host, from the shared per-element math
// (kernels/ddim_step.h). Used by the CPU backend's loop and by ddim::Scheduler::step.
#include <span>

#include "kernels/ddim_step.h"
#include "schedule/ddim_params.hpp"

namespace ddim {

// x (E) <- DDIM step of x with model output `out` (E). z: unit normal noise (E), needed when
// p.sigma > 0, else may be empty. x0 (E) receives the clipped x0 prediction. With p.clip ==
// kClipThreshold the per-sample bound comes from dynamic_threshold(ratio, max_value).
void ddim_step_sample(const DdimStepParams& p, std::span<float> x, std::span<const float> out, std::span<const float> z,
                      std::span<float> x0, double threshold_ratio, double threshold_max);

}  // namespace ddim
