// DDIM inversion, host half: from the sampling timesteps to the ascending inversion steps and
// their parameters for the shared DDIM update (definitions in ddim/toolkit.hpp). The coefficients
// are computed in double and rounded once to float, as for sampling.
#include "sampler/inversion.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "ddim/error.hpp"
#include "schedule/ddim_params.hpp"

namespace ddim {
namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::InvalidArgument, "invert: " + message); }

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.6g", v);
  return buf;
}

std::string point(int t) { return t < 0 ? std::string("t = -1 (x0)") : "timestep " + std::to_string(t); }

}  // namespace

const char* to_string(ModelTime m) noexcept {
  switch (m) {
    case ModelTime::Current: return "current";
    case ModelTime::Next: return "next";
  }
  return "?";
}

ModelTime parse_model_time(const std::string& s) {
  if (s == "current") return ModelTime::Current;
  if (s == "next") return ModelTime::Next;
  throw Error(ErrorCode::InvalidArgument, "unknown model time '" + s + "' (expected current or next)");
}

InversionPlan plan_inversion(const Scheduler& scheduler, const InvertOptions& o) {
  if (o.model_time != ModelTime::Current && o.model_time != ModelTime::Next) invalid("unknown model_time value");
  TimestepPlan sampling;
  if (!o.timesteps.empty()) {
    sampling = scheduler.custom_timesteps(o.timesteps);
  } else {
    if (o.steps < 1) invalid("steps must be at least 1, got " + std::to_string(o.steps));
    if (o.spacing == Spacing::Custom) invalid("spacing 'custom' needs a timestep list (InvertOptions::timesteps)");
    sampling = scheduler.timesteps(o.steps, o.spacing);
  }

  const ScheduleConfig& config = scheduler.config();
  const std::vector<double>& ac = scheduler.alphas_cumprod();
  const int T = config.num_train_timesteps;
  // alpha(-1): the sampler's final alpha-bar, diffusers' initial_alpha_cumprod of the inverse scheduler.
  const double alpha_start = config.set_alpha_to_one ? 1.0 : ac[0];
  const auto alpha = [&](int t) { return t < 0 ? alpha_start : ac[static_cast<std::size_t>(t)]; };
  // diffusers: num_train_timesteps // num_inference_steps (the step count asked for).
  const int ratio = T / std::max(1, sampling.requested);
  const bool next = o.model_time == ModelTime::Next;

  InversionPlan plan;
  plan.warning = sampling.warning;
  plan.timesteps.assign(sampling.timesteps.rbegin(), sampling.timesteps.rend());
  const std::size_t S = plan.timesteps.size();
  StepOptions options;  // eta 0; clipping is set below
  options.clip_sample = false;
  for (std::size_t k = 0; k < S; ++k) {
    const int to = plan.timesteps[k];
    const int from = k == 0 ? -1 : plan.timesteps[k - 1];
    const int source = next ? std::min(to - ratio, T - 1) : from;
    const int model_t = next || k == 0 ? to : from;
    DdimCoefficients c;
    c.t = model_t;
    c.t_prev = to;
    c.alpha_t = alpha(source);
    c.alpha_prev = alpha(to);
    c.sigma = 0.0;
    c.dir = std::sqrt(std::max(0.0, 1.0 - c.alpha_prev));
    if (c.alpha_t == 0.0 && config.prediction_type == PredictionType::Epsilon)
      invalid("alpha-bar at " + point(source) + " is 0: an epsilon-prediction model cannot predict x0 there");
    if (c.alpha_t == 1.0 && config.prediction_type == PredictionType::Sample)
      invalid("alpha-bar at " + point(source) + " is " + num(c.alpha_t) +
              ": a sample-prediction model's noise cannot be recovered there (set_alpha_to_one is on)");
    DdimStepParams p = make_step_params(c, config, options);
    p.clip = next && config.clip_sample ? kClipRange : kClipNone;  // no thresholding in either mode
    p.use_clipped_model_output = 0;
    plan.model_timesteps.push_back(model_t);
    plan.steps.push_back(p);
  }
  return plan;
}

}  // namespace ddim
