#pragma once
// From the scheduler's double-precision coefficients to the float parameters of the shared
// per-element DDIM update (kernels/ddim_step.h), used by ddim::Scheduler::step and the backends.
#include <span>

#include "ddim/schedule.hpp"
#include "kernels/ddim_step.h"

namespace ddim {

// Rounds each coefficient once to float. Clipping follows diffusers: dynamic thresholding
// (config.thresholding) wins over clip_sample (options.clip_sample, else config.clip_sample).
DdimStepParams make_step_params(const DdimCoefficients& coefficients, const ScheduleConfig& config,
                                const StepOptions& options);

// The dynamic-thresholding bound of one sample's x0 prediction (Imagen; diffusers'
// _threshold_sample): s = clamp(quantile(|x0|, ratio), 1, max_value), the quantile with
// torch.quantile's linear interpolation (sorted |x0|, position ratio * (n - 1)), in double.
// Throws ddim::Error(InvalidArgument) on an empty sample or a ratio outside (0, 1].
float dynamic_threshold(std::span<const float> x0_one_sample, double ratio, double max_value);

}  // namespace ddim
