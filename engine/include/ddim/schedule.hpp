#pragma once
// Noise schedules, timestep spacings and the DDIM step, usable without a model: any denoiser
// can drive ddim::Scheduler. All host math is in double; per-element math is shared with the
// backends (kernels/ddim_step.h).
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ddim/export.hpp"

namespace ddim {

enum class BetaSchedule { Linear, ScaledLinear, SquaredCosCapV2 };
enum class PredictionType { Epsilon, VPrediction, Sample };
// Leading, Trailing, Linspace: diffusers' DDIMScheduler. Uniform, Quadratic: the DDIM paper's
// code. Log: geometric between 1 and T-1, deduplicated (see weights/FORMAT.md). Custom: a list.
enum class Spacing { Leading, Trailing, Linspace, Uniform, Quadratic, Log, Custom };
enum class VarianceType { FixedSmall, FixedSmallLog, FixedLarge, FixedLargeLog, Learned, LearnedRange };

DDIM_API const char* to_string(BetaSchedule) noexcept;
DDIM_API const char* to_string(PredictionType) noexcept;
DDIM_API const char* to_string(Spacing) noexcept;
DDIM_API const char* to_string(VarianceType) noexcept;
// Parse the diffusers spelling ("scaled_linear", "v_prediction", "trailing", "fixed_small", ...).
// Throws ddim::Error(InvalidArgument) naming the accepted values.
DDIM_API BetaSchedule parse_beta_schedule(const std::string&);
DDIM_API PredictionType parse_prediction_type(const std::string&);
DDIM_API Spacing parse_spacing(const std::string&);
DDIM_API VarianceType parse_variance_type(const std::string&);

// The schedule a model was trained with and its sampling defaults. Defaults are diffusers'
// DDIMScheduler defaults.
struct DDIM_API ScheduleConfig {
  int num_train_timesteps = 1000;
  BetaSchedule beta_schedule = BetaSchedule::Linear;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::vector<double> alphas_cumprod;  // when non-empty: the table itself (size T), betas unused
  bool rescale_betas_zero_snr = false;
  PredictionType prediction_type = PredictionType::Epsilon;
  Spacing timestep_spacing = Spacing::Leading;
  int steps_offset = 0;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = true;
  bool thresholding = false;
  double dynamic_thresholding_ratio = 0.995;
  double sample_max_value = 1.0;
  VarianceType variance_type = VarianceType::FixedSmall;

  // Throws ddim::Error(InvalidArgument) naming the first inconsistent field.
  void validate() const;
};

// The timesteps a sampling run visits, in sampling order (most noisy first).
struct TimestepPlan {
  std::vector<int> timesteps;
  int requested = 0;    // the step count asked for
  std::string warning;  // non-empty when the spacing gave a different number of distinct steps
};

// Per-step DDIM coefficients (double; backends cast once at plan time).
struct DdimCoefficients {
  int t = 0;
  int t_prev = -1;         // -1: the final step
  double alpha_t = 0;      // alpha-bar at t
  double alpha_prev = 0;   // alpha-bar at t_prev (final: 1 with set_alpha_to_one, else alpha-bar_0)
  double sigma = 0;        // eta * sqrt((1-a_prev)/(1-a_t)) * sqrt(1 - a_t/a_prev)
  double dir = 0;          // sqrt(1 - a_prev - sigma^2): the coefficient of the predicted noise
};

// Options of one DDIM step that are not part of the trained schedule (all default to the config).
struct StepOptions {
  double eta = 0.0;
  bool use_clipped_model_output = false;
  std::optional<bool> clip_sample;
  std::optional<bool> set_alpha_to_one;
};

class DDIM_API Scheduler {
 public:
  // Validates the config and computes alphas_cumprod (double).
  explicit Scheduler(ScheduleConfig config);

  const ScheduleConfig& config() const noexcept { return config_; }
  const std::vector<double>& alphas_cumprod() const noexcept { return alphas_cumprod_; }

  // Timesteps for num_steps with a spacing (default: the config's) and steps_offset (default:
  // the config's; used by Leading only, as diffusers' DDIMScheduler does). Throws on num_steps < 1
  // or > T, and on a timestep outside [0, T) (a steps_offset pushing Leading past T-1).
  TimestepPlan timesteps(int num_steps, std::optional<Spacing> spacing = std::nullopt,
                         std::optional<int> steps_offset = std::nullopt) const;
  // A caller's list: strictly decreasing, each in [0, T). Throws naming the offending entry.
  TimestepPlan custom_timesteps(std::vector<int> timesteps) const;

  // Coefficients of every step of a plan; step i goes from timesteps[i] to timesteps[i+1]
  // (the last step to "t = -1", i.e. the final alpha).
  std::vector<DdimCoefficients> coefficients(std::span<const int> timesteps, const StepOptions& options) const;
  // Coefficients of one step t -> t_prev (t_prev = -1: the final step). Throws on t outside
  // [0, T), t_prev outside [-1, t), eta < 0, or a step that would divide by zero (alpha-bar 0 at t
  // with epsilon prediction; alpha-bar 1 at t with sample prediction or use_clipped_model_output).
  DdimCoefficients step_coefficients(int t, int t_prev, const StepOptions& options) const;

  // One DDIM step on caller arrays of `batch` samples of `sample_size` elements each:
  //   prev_sample = step(model_output, t -> t_prev, sample). `noise` (unit normal, same size)
  // is required when sigma > 0 and ignored otherwise; `pred_x0` receives the x0 prediction
  // when non-empty. t_prev = -1 means the final step.
  void step(std::span<const float> model_output, int t, int t_prev, std::span<const float> sample,
            std::span<float> prev_sample, std::size_t batch, const StepOptions& options,
            std::span<const float> noise = {}, std::span<float> pred_x0 = {}) const;

 private:
  ScheduleConfig config_;
  std::vector<double> alphas_cumprod_;
};

}  // namespace ddim
