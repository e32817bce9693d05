#pragma once
// From the scheduler's double-precision coefficients to the float parameters of the shared
// per-element DDIM update (kernels/ddim_step.h), used by ddim::Scheduler::step and the backends.
#include <optional>
#include <span>

#include "ddim/schedule.hpp"
#include "kernels/ddim_step.h"
#include "kernels/ddpm_step.h"

namespace ddim {

// Rounds each coefficient once to float. Clipping follows diffusers: dynamic thresholding
// (config.thresholding) wins over clip_sample (options.clip_sample, else config.clip_sample).
DdimStepParams make_step_params(const DdimCoefficients& coefficients, const ScheduleConfig& config,
                                const StepOptions& options);

// The parameters of the DDPM step from t to t - 1 (kernels/ddpm_step.h; diffusers'
// DDPMScheduler.step): coefficients in double from alphas_cumprod, rounded once to float;
// variance FixedSmall (FixedSmallLog gives the same standard deviation) or FixedLarge, sigma 0 at
// t = 0. Clipping as make_step_params: thresholding wins over clip_sample (else the config's).
// Throws ddim::Error(InvalidArgument) on t outside [0, T) or a step that divides by zero
// (alpha-bar_t = 1, or alpha-bar_t = 0 with epsilon prediction), Unsupported on another variance.
DdimStepParams make_ddpm_step_params(int t, std::span<const double> alphas_cumprod, const ScheduleConfig& config,
                                     VarianceType variance, std::optional<bool> clip_sample);

// The dynamic-thresholding bound of one sample's x0 prediction (Imagen; diffusers'
// _threshold_sample): s = clamp(quantile(|x0|, ratio), 1, max_value), the quantile with
// torch.quantile's linear interpolation (sorted |x0|, position ratio * (n - 1)), in double.
// Throws ddim::Error(InvalidArgument) on an empty sample or a ratio outside (0, 1].
float dynamic_threshold(std::span<const float> x0_one_sample, double ratio, double max_value);

// One DDIM or DDPM step (p.update) of one sample (E elements) on the host, from the shared per-element math: used
// by Scheduler::step and the CPU backend's loop. z: unit normal noise, needed when p.sigma > 0
// (else may be empty); x0 receives the clipped x0 prediction; prev may alias x. With
// p.clip == kClipThreshold the per-sample bound is dynamic_threshold(ratio, max_value).
void ddim_step_sample(const DdimStepParams& p, std::span<const float> x, std::span<const float> out,
                      std::span<const float> z, std::span<float> x0, std::span<float> prev, double threshold_ratio,
                      double threshold_max);

}  // namespace ddim
