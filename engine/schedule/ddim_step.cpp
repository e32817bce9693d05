// The DDIM step on caller arrays (diffusers' DDIMScheduler.step), built on the per-element math
// the backends share (kernels/ddim_step.h), and the float step parameters the backends upload.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "ddim/error.hpp"
#include "ddim/schedule.hpp"
#include "schedule/ddim_params.hpp"

namespace ddim {
namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::InvalidArgument, message); }

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

int prediction_code(PredictionType p) {
  switch (p) {
    case PredictionType::VPrediction: return kPredV;
    case PredictionType::Sample: return kPredSample;
    case PredictionType::Epsilon: break;
  }
  return kPredEpsilon;
}

}  // namespace

DdimStepParams make_step_params(const DdimCoefficients& c, const ScheduleConfig& config, const StepOptions& options) {
  DdimStepParams p;
  p.sqrt_alpha_t = static_cast<float>(std::sqrt(c.alpha_t));
  p.sqrt_one_minus_alpha_t = static_cast<float>(std::sqrt(1.0 - c.alpha_t));
  p.sqrt_alpha_prev = static_cast<float>(std::sqrt(c.alpha_prev));
  p.dir = static_cast<float>(c.dir);
  p.sigma = static_cast<float>(c.sigma);
  p.clip_range = static_cast<float>(config.clip_sample_range);
  p.prediction = prediction_code(config.prediction_type);
  p.clip = config.thresholding                                         ? kClipThreshold
           : options.clip_sample.value_or(config.clip_sample) ? kClipRange
                                                                       : kClipNone;
  p.use_clipped_model_output = options.use_clipped_model_output ? 1 : 0;
  p.t = c.t;
  return p;
}

DdimStepParams make_ddpm_step_params(int t, std::span<const double> ac, const ScheduleConfig& config,
                                     VarianceType variance, std::optional<bool> clip_sample) {
  const int T = static_cast<int>(ac.size());
  if (t < 0 || t >= T) invalid("DDPM step: timestep " + std::to_string(t) + " is outside [0, " + std::to_string(T) + ")");
  if (variance != VarianceType::FixedSmall && variance != VarianceType::FixedSmallLog &&
      variance != VarianceType::FixedLarge)
    throw Error(ErrorCode::Unsupported, std::string("DDPM sampling supports the variance types fixed_small and "
                                                    "fixed_large (fixed_small_log), not ") + to_string(variance));
  const double a_t = ac[static_cast<std::size_t>(t)];
  const double a_prev = t > 0 ? ac[static_cast<std::size_t>(t - 1)] : 1.0;
  if (!(a_t < 1.0)) invalid("DDPM step: alpha-bar at timestep " + std::to_string(t) + " is 1 (no noise to remove)");
  if (!(a_t > 0.0) && config.prediction_type == PredictionType::Epsilon)
    invalid("DDPM step: alpha-bar at timestep " + std::to_string(t) + " is 0, where an epsilon model cannot predict x0");
  const double alpha = a_t / a_prev, beta = 1.0 - alpha;
  DdimStepParams p;
  p.update = kUpdateDdpm;
  p.t = t;
  p.sqrt_alpha_t = static_cast<float>(std::sqrt(a_t));
  p.sqrt_one_minus_alpha_t = static_cast<float>(std::sqrt(1.0 - a_t));
  p.sqrt_alpha_prev = static_cast<float>(std::sqrt(a_prev));
  p.coef_x0 = static_cast<float>(std::sqrt(a_prev) * beta / (1.0 - a_t));
  p.coef_xt = static_cast<float>(std::sqrt(alpha) * (1.0 - a_prev) / (1.0 - a_t));
  double var = 0.0;
  if (t > 0) var = variance == VarianceType::FixedLarge ? beta : std::max((1.0 - a_prev) / (1.0 - a_t) * beta, 1e-20);
  p.sigma = static_cast<float>(std::sqrt(var));
  p.dir = 0.f;
  p.clip_range = static_cast<float>(config.clip_sample_range);
  p.prediction = prediction_code(config.prediction_type);
  p.clip = config.thresholding ? kClipThreshold : clip_sample.value_or(config.clip_sample) ? kClipRange : kClipNone;
  return p;
}

float dynamic_threshold(std::span<const float> x0, double ratio, double max_value) {
  if (x0.empty()) invalid("dynamic thresholding of an empty sample");
  if (!(ratio > 0.0 && ratio <= 1.0)) invalid("dynamic_thresholding_ratio must be in (0, 1]");
  std::vector<double> a(x0.size());
  for (std::size_t i = 0; i < x0.size(); ++i) {
    a[i] = std::fabs(static_cast<double>(x0[i]));
    if (std::isnan(a[i])) return std::numeric_limits<float>::quiet_NaN();  // torch.quantile: NaN
  }
  std::sort(a.begin(), a.end());
  // torch.quantile(interpolation="linear"): rank = q (n - 1), lerp between the neighbours.
  const double rank = ratio * static_cast<double>(a.size() - 1);
  const std::size_t below = static_cast<std::size_t>(rank);
  const std::size_t above = std::min(below + 1, a.size() - 1);
  const double w = rank - static_cast<double>(below);
  const double lo = a[below];
  const double hi = a[above];
  const double q = w < 0.5 ? lo + w * (hi - lo) : hi - (hi - lo) * (1.0 - w);  // torch.lerp
  // torch.clamp(s, min=1, max=sample_max_value): max wins when max_value < 1.
  return static_cast<float>(std::min(std::max(q, 1.0), max_value));
}

void ddim_step_sample(const DdimStepParams& p, std::span<const float> x, std::span<const float> out,
                      std::span<const float> z, std::span<float> x0, std::span<float> prev, double threshold_ratio,
                      double threshold_max) {
  const std::size_t n = x.size();
  if (out.size() != n || x0.size() != n || prev.size() != n || (p.sigma > 0.f && z.size() != n))
    throw Error(ErrorCode::Internal, "ddim_step_sample: span sizes disagree");
  for (std::size_t i = 0; i < n; ++i) x0[i] = ddim_pred_x0(x[i], out[i], p);
  const float s = p.clip == kClipThreshold ? dynamic_threshold(x0, threshold_ratio, threshold_max) : 1.f;
  for (std::size_t i = 0; i < n; ++i) {
    x0[i] = ddim_clip_x0(x0[i], p, s);
    prev[i] = step_prev_sample(x[i], out[i], x0[i], p.sigma > 0.f ? z[i] : 0.f, p);  // prev may alias x
  }
}

void Scheduler::step(std::span<const float> model_output, int t, int t_prev, std::span<const float> sample,
                     std::span<float> prev_sample, std::size_t batch, const StepOptions& options,
                     std::span<const float> noise, std::span<float> pred_x0) const {
  const std::size_t n = sample.size();
  const auto sz = [](std::size_t v) { return std::to_string(v); };
  if (batch == 0) invalid("Scheduler::step: batch must be at least 1");
  if (n == 0) invalid("Scheduler::step: sample is empty");
  if (n % batch != 0)
    invalid("Scheduler::step: sample has " + sz(n) + " elements, not a multiple of batch " + sz(batch));
  if (model_output.size() != n)
    invalid("Scheduler::step: model_output has " + sz(model_output.size()) + " elements; sample has " + sz(n));
  if (prev_sample.size() != n)
    invalid("Scheduler::step: prev_sample has " + sz(prev_sample.size()) + " elements; sample has " + sz(n));
  if (!pred_x0.empty() && pred_x0.size() != n)
    invalid("Scheduler::step: pred_x0 has " + sz(pred_x0.size()) + " elements; sample has " + sz(n) +
            " (pass an empty span for none)");
  if (!noise.empty() && noise.size() != n)
    invalid("Scheduler::step: noise has " + sz(noise.size()) + " elements; sample has " + sz(n));

  const DdimCoefficients c = step_coefficients(t, t_prev, options);
  const DdimStepParams p = make_step_params(c, config_, options);
  const bool with_noise = p.sigma > 0.f;
  if (with_noise && noise.empty())
    invalid("Scheduler::step: eta " + num(options.eta) + " gives sigma " + num(c.sigma) +
            " > 0 for the step from timestep " + std::to_string(t) + ": noise of " + sz(n) + " elements is required");

  const std::size_t per = n / batch;
  std::vector<float> x0(per);
  for (std::size_t b = 0; b < batch; ++b) {
    const std::size_t base = b * per;
    ddim_step_sample(p, sample.subspan(base, per), model_output.subspan(base, per),
                     with_noise ? noise.subspan(base, per) : std::span<const float>(), x0, prev_sample.subspan(base, per),
                     config_.dynamic_thresholding_ratio, config_.sample_max_value);
    if (!pred_x0.empty()) std::copy(x0.begin(), x0.end(), pred_x0.begin() + std::ptrdiff_t(base));
  }
}

}  // namespace ddim
