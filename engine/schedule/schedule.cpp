// Noise schedules, timestep spacings and per-step DDIM coefficients (host math, double).
//
// The spacings reproduce diffusers' DDIMScheduler.set_timesteps integer for integer, including
// numpy's arithmetic: np.linspace (i * step, last entry = stop), np.arange with a float step
// (length ceil((stop - start) / step), entries start + i * ((start + step) - start)) and np.round
// (half to even). The DDIM paper's own spacings (ermongroup/ddim, runners/diffusion.py) are
// "uniform" and "quadratic".
#include "ddim/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <utility>

#include "ddim/error.hpp"

namespace ddim {
namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::InvalidArgument, message); }

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

// The largest table we accept: guards hostile configs against huge allocations.
constexpr int kMaxTrainTimesteps = 1000000;

// numpy.round / np.rint: round half to even (the default floating-point rounding mode).
long long round_half_even(double v) { return static_cast<long long>(std::nearbyint(v)); }

// np.linspace(start, stop, n) (endpoint=True): start + i * ((stop - start) / (n - 1)), the last
// entry exactly stop; n == 1 gives {start}.
std::vector<double> np_linspace(double start, double stop, int n) {
  std::vector<double> y(static_cast<std::size_t>(n));
  if (n == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / (n - 1);
  for (int i = 0; i < n; ++i) y[static_cast<std::size_t>(i)] = static_cast<double>(i) * step + start;
  y.back() = stop;
  return y;
}

// cumprod(1 - betas).
std::vector<double> cumprod_of_betas(const std::vector<double>& betas) {
  std::vector<double> ac(betas.size());
  double prod = 1.0;
  for (std::size_t i = 0; i < betas.size(); ++i) {
    prod *= 1.0 - betas[i];
    ac[i] = prod;
  }
  return ac;
}

// betas_for_alpha_bar with the cosine alpha-bar (Nichol & Dhariwal 2021; diffusers'
// squaredcos_cap_v2): beta_i = min(1 - ab((i+1)/T) / ab(i/T), 0.999).
std::vector<double> cosine_betas(int T) {
  const double pi = 3.14159265358979323846;
  const auto alpha_bar = [pi](double t) {
    const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
    return c * c;
  };
  std::vector<double> betas(static_cast<std::size_t>(T));
  for (int i = 0; i < T; ++i) {
    const double t1 = static_cast<double>(i) / T;
    const double t2 = static_cast<double>(i + 1) / T;
    betas[static_cast<std::size_t>(i)] = std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), 0.999);
  }
  return betas;
}

// diffusers' rescale_zero_terminal_snr (Lin et al. 2023, Algorithm 1), applied to alpha-bar:
// shift sqrt(alpha-bar) so the last entry is 0, scale it so the first is unchanged. Idempotent.
void rescale_zero_terminal_snr(std::vector<double>& ac) {
  const std::size_t n = ac.size();
  std::vector<double> s(n);
  for (std::size_t i = 0; i < n; ++i) s[i] = std::sqrt(ac[i]);
  const double s0 = s.front();
  const double sT = s.back();
  if (!(s0 > sT))
    invalid("rescale_betas_zero_snr needs alpha-bar at t = 0 (" + num(ac.front()) + ") above alpha-bar at t = T-1 (" +
            num(ac.back()) + ")");
  const double scale = s0 / (s0 - sT);
  for (std::size_t i = 0; i < n; ++i) {
    const double v = (s[i] - sT) * scale;
    ac[i] = v * v;
  }
  ac.back() = 0.0;
}

std::vector<double> compute_alphas_cumprod(const ScheduleConfig& c) {
  std::vector<double> ac;
  if (!c.alphas_cumprod.empty()) {
    ac = c.alphas_cumprod;
  } else {
    std::vector<double> betas;
    switch (c.beta_schedule) {
      case BetaSchedule::Linear:
        betas = np_linspace(c.beta_start, c.beta_end, c.num_train_timesteps);
        break;
      case BetaSchedule::ScaledLinear:
        betas = np_linspace(std::sqrt(c.beta_start), std::sqrt(c.beta_end), c.num_train_timesteps);
        for (double& b : betas) b = b * b;
        break;
      case BetaSchedule::SquaredCosCapV2:
        betas = cosine_betas(c.num_train_timesteps);
        break;
    }
    ac = cumprod_of_betas(betas);
  }
  if (c.rescale_betas_zero_snr) rescale_zero_terminal_snr(ac);
  for (std::size_t i = 0; i < ac.size(); ++i)
    if (!std::isfinite(ac[i]) || ac[i] < 0.0 || ac[i] > 1.0)
      invalid("alphas_cumprod[" + std::to_string(i) + "] = " + num(ac[i]) + " is outside [0, 1]");
  return ac;
}

// Removes repeats (every spacing is non-increasing, so repeats are adjacent), checks the result
// is strictly decreasing and in [0, T), and fills the warning when the count differs from the
// request.
TimestepPlan finish_plan(std::vector<long long> ts, int requested, Spacing spacing, int T) {
  std::vector<int> out;
  out.reserve(ts.size());
  for (long long t : ts) {
    if (t < 0 || t >= T)
      invalid(std::string("spacing ") + to_string(spacing) + " with " + std::to_string(requested) +
              " steps gives timestep " + std::to_string(t) + ", outside [0, " + std::to_string(T) +
              ") (check steps_offset)");
    const int ti = static_cast<int>(t);
    if (out.empty() || out.back() != ti) out.push_back(ti);
  }
  for (std::size_t i = 1; i < out.size(); ++i)
    if (out[i] >= out[i - 1])
      throw Error(ErrorCode::Internal, std::string("spacing ") + to_string(spacing) + " gave timesteps out of order");
  TimestepPlan plan;
  plan.requested = requested;
  if (static_cast<int>(out.size()) != requested) {
    const std::string k = std::to_string(out.size());
    plan.warning = std::string("spacing ") + to_string(spacing) + " with " + std::to_string(requested) +
                   " steps gives " + k + " distinct timesteps; using " + k;
  }
  plan.timesteps = std::move(out);
  return plan;
}

}  // namespace

// ---------------------------------------------------------------- names

const char* to_string(BetaSchedule v) noexcept {
  switch (v) {
    case BetaSchedule::Linear: return "linear";
    case BetaSchedule::ScaledLinear: return "scaled_linear";
    case BetaSchedule::SquaredCosCapV2: return "squaredcos_cap_v2";
  }
  return "unknown";
}

const char* to_string(PredictionType v) noexcept {
  switch (v) {
    case PredictionType::Epsilon: return "epsilon";
    case PredictionType::VPrediction: return "v_prediction";
    case PredictionType::Sample: return "sample";
  }
  return "unknown";
}

const char* to_string(Spacing v) noexcept {
  switch (v) {
    case Spacing::Leading: return "leading";
    case Spacing::Trailing: return "trailing";
    case Spacing::Linspace: return "linspace";
    case Spacing::Uniform: return "uniform";
    case Spacing::Quadratic: return "quadratic";
    case Spacing::Log: return "log";
    case Spacing::Custom: return "custom";
  }
  return "unknown";
}

const char* to_string(VarianceType v) noexcept {
  switch (v) {
    case VarianceType::FixedSmall: return "fixed_small";
    case VarianceType::FixedSmallLog: return "fixed_small_log";
    case VarianceType::FixedLarge: return "fixed_large";
    case VarianceType::FixedLargeLog: return "fixed_large_log";
    case VarianceType::Learned: return "learned";
    case VarianceType::LearnedRange: return "learned_range";
  }
  return "unknown";
}

namespace {
template <class E, std::size_t N>
E parse_enum(const std::string& s, const char* what, const E (&values)[N]) {
  std::string accepted;
  for (E v : values) {
    if (s == to_string(v)) return v;
    accepted += accepted.empty() ? "" : ", ";
    accepted += to_string(v);
  }
  invalid(std::string("unknown ") + what + " '" + s + "'; accepted: " + accepted);
}
}  // namespace

BetaSchedule parse_beta_schedule(const std::string& s) {
  static constexpr BetaSchedule kValues[] = {BetaSchedule::Linear, BetaSchedule::ScaledLinear,
                                             BetaSchedule::SquaredCosCapV2};
  return parse_enum(s, "beta schedule", kValues);
}

PredictionType parse_prediction_type(const std::string& s) {
  static constexpr PredictionType kValues[] = {PredictionType::Epsilon, PredictionType::VPrediction,
                                               PredictionType::Sample};
  return parse_enum(s, "prediction type", kValues);
}

Spacing parse_spacing(const std::string& s) {
  // "custom" is not a spelling a config can name: a custom list comes with its timesteps.
  static constexpr Spacing kValues[] = {Spacing::Leading, Spacing::Trailing,  Spacing::Linspace,
                                        Spacing::Uniform, Spacing::Quadratic, Spacing::Log};
  return parse_enum(s, "timestep spacing", kValues);
}

VarianceType parse_variance_type(const std::string& s) {
  static constexpr VarianceType kValues[] = {VarianceType::FixedSmall, VarianceType::FixedSmallLog,
                                             VarianceType::FixedLarge, VarianceType::FixedLargeLog,
                                             VarianceType::Learned,    VarianceType::LearnedRange};
  return parse_enum(s, "variance type", kValues);
}

// ---------------------------------------------------------------- config

void ScheduleConfig::validate() const {
  const int T = num_train_timesteps;
  if (T < 1 || T > kMaxTrainTimesteps)
    invalid("num_train_timesteps must be in [1, " + std::to_string(kMaxTrainTimesteps) + "] (got " +
            std::to_string(T) + ")");
  if (alphas_cumprod.empty()) {
    if (beta_schedule == BetaSchedule::Linear || beta_schedule == BetaSchedule::ScaledLinear) {
      if (!(std::isfinite(beta_start) && std::isfinite(beta_end) && beta_start > 0.0 && beta_start <= beta_end &&
            beta_end < 1.0))
        invalid(std::string("beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1 for the ") +
                to_string(beta_schedule) + " schedule (got beta_start " + num(beta_start) + ", beta_end " +
                num(beta_end) + ")");
    }
  } else {
    if (alphas_cumprod.size() != static_cast<std::size_t>(T))
      invalid("alphas_cumprod has " + std::to_string(alphas_cumprod.size()) + " entries; num_train_timesteps is " +
              std::to_string(T));
    for (std::size_t i = 0; i < alphas_cumprod.size(); ++i) {
      const double a = alphas_cumprod[i];
      if (!(std::isfinite(a) && a > 0.0 && a <= 1.0))
        invalid("alphas_cumprod[" + std::to_string(i) + "] = " + num(a) + " is outside (0, 1]");
    }
  }
  if (rescale_betas_zero_snr && T < 2) invalid("rescale_betas_zero_snr needs num_train_timesteps >= 2");
  if (!(std::isfinite(clip_sample_range) && clip_sample_range > 0.0))
    invalid("clip_sample_range must be > 0 (got " + num(clip_sample_range) + ")");
  if (!(dynamic_thresholding_ratio > 0.0 && dynamic_thresholding_ratio <= 1.0))
    invalid("dynamic_thresholding_ratio must be in (0, 1] (got " + num(dynamic_thresholding_ratio) + ")");
  if (!(std::isfinite(sample_max_value) && sample_max_value > 0.0))
    invalid("sample_max_value must be > 0 (got " + num(sample_max_value) + ")");
  if (steps_offset < 0) invalid("steps_offset must be >= 0 (got " + std::to_string(steps_offset) + ")");
}

// ---------------------------------------------------------------- scheduler

Scheduler::Scheduler(ScheduleConfig config) : config_(std::move(config)) {
  config_.validate();
  alphas_cumprod_ = compute_alphas_cumprod(config_);
}

TimestepPlan Scheduler::timesteps(int num_steps, std::optional<Spacing> spacing, std::optional<int> steps_offset) const {
  const int T = config_.num_train_timesteps;
  const int S = num_steps;
  const Spacing sp = spacing.value_or(config_.timestep_spacing);
  const int offset = steps_offset.value_or(config_.steps_offset);
  if (S < 1) invalid("num_steps must be at least 1 (got " + std::to_string(S) + "; num_train_timesteps is " +
                     std::to_string(T) + ")");
  if (S > T)
    invalid("num_steps " + std::to_string(S) + " exceeds num_train_timesteps " + std::to_string(T));
  if (offset < 0) invalid("steps_offset must be >= 0 (got " + std::to_string(offset) + ")");

  std::vector<long long> ts;
  switch (sp) {
    case Spacing::Leading: {
      // (arange(0, S) * (T // S)).round()[::-1] + steps_offset
      const long long ratio = T / S;
      for (int i = S - 1; i >= 0; --i) ts.push_back(i * ratio + offset);
      break;
    }
    case Spacing::Trailing: {
      // round(arange(T, 0, -T / S)) - 1, with numpy's arange arithmetic. numpy can produce one
      // extra entry (e.g. T = 50, S = 29: the last is ~ -3.6e-14, i.e. timestep -1, which diffusers
      // would index from the end of its table); such entries below 0 are dropped.
      const double step = -(static_cast<double>(T) / S);
      const double len = std::ceil((0.0 - T) / step);
      const double v0 = static_cast<double>(T);
      const double delta = (v0 + step) - v0;
      for (long long i = 0; i < static_cast<long long>(len); ++i) {
        const double v = i == 0 ? v0 : (i == 1 ? v0 + step : v0 + static_cast<double>(i) * delta);
        const long long t = round_half_even(v) - 1;
        if (t >= 0) ts.push_back(t);
      }
      break;
    }
    case Spacing::Linspace: {
      // linspace(0, T - 1, S).round()[::-1]; diffusers' DDIMScheduler does not add steps_offset.
      const std::vector<double> y = np_linspace(0.0, static_cast<double>(T - 1), S);
      for (int i = S - 1; i >= 0; --i) ts.push_back(round_half_even(y[static_cast<std::size_t>(i)]));
      break;
    }
    case Spacing::Uniform: {
      // The DDIM paper's code: range(0, T, T // S), reversed. Gives ceil(T / (T // S)) >= S steps.
      const int skip = T / S;
      for (long long t = 0; t < T; t += skip) ts.push_back(t);
      std::reverse(ts.begin(), ts.end());
      break;
    }
    case Spacing::Quadratic: {
      // The DDIM paper's code: [int(s) for s in linspace(0, sqrt(T * 0.8), S) ** 2], reversed.
      const std::vector<double> y = np_linspace(0.0, std::sqrt(static_cast<double>(T) * 0.8), S);
      for (int i = S - 1; i >= 0; --i) {
        const double v = y[static_cast<std::size_t>(i)];
        ts.push_back(static_cast<long long>(v * v));
      }
      break;
    }
    case Spacing::Log: {
      // Our definition: S points geometric between 1 and T - 1,
      //   t_i = round_half_even(exp(linspace(0, ln(T - 1), S)[i])), i = 0 .. S-1,
      // the last point set to exactly T - 1, deduplicated (small t repeat when S is large), in
      // decreasing order. S == 1 gives {T - 1}. Dense near t = 1 (the low-noise end), sparse near
      // T - 1; t = 0 is never visited (the final step goes from t_0 = 1 to the final alpha).
      if (S == 1) {
        ts.push_back(T - 1);
      } else {
        const std::vector<double> y = np_linspace(0.0, std::log(static_cast<double>(T - 1)), S);
        for (int i = S - 1; i >= 0; --i)
          ts.push_back(i == S - 1 ? T - 1 : round_half_even(std::exp(y[static_cast<std::size_t>(i)])));
      }
      break;
    }
    case Spacing::Custom:
      invalid("spacing 'custom' needs the list itself: use Scheduler::custom_timesteps");
  }
  return finish_plan(std::move(ts), S, sp, T);
}

TimestepPlan Scheduler::custom_timesteps(std::vector<int> ts) const {
  const int T = config_.num_train_timesteps;
  if (ts.empty()) invalid("custom timesteps: the list is empty");
  for (std::size_t i = 0; i < ts.size(); ++i) {
    if (ts[i] < 0 || ts[i] >= T)
      invalid("custom timesteps: entry " + std::to_string(i) + " (" + std::to_string(ts[i]) + ") is outside [0, " +
              std::to_string(T) + ")");
    if (i > 0 && ts[i] >= ts[i - 1])
      invalid("custom timesteps: entry " + std::to_string(i) + " (" + std::to_string(ts[i]) +
              ") is not below the previous entry (" + std::to_string(ts[i - 1]) +
              "); timesteps must be strictly decreasing");
  }
  TimestepPlan plan;
  plan.requested = static_cast<int>(ts.size());
  plan.timesteps = std::move(ts);
  return plan;
}

DdimCoefficients Scheduler::step_coefficients(int t, int t_prev, const StepOptions& options) const {
  const int T = config_.num_train_timesteps;
  if (!(options.eta >= 0.0 && std::isfinite(options.eta)))
    invalid("eta must be finite and >= 0 (got " + num(options.eta) + ")");
  if (t < 0 || t >= T)
    invalid("timestep " + std::to_string(t) + " is outside [0, " + std::to_string(T) + ")");
  if (t_prev < -1 || t_prev >= t)
    invalid("previous timestep " + std::to_string(t_prev) + " must be in [-1, " + std::to_string(t) +
            ") for the step from timestep " + std::to_string(t));

  const std::vector<double>& ac = alphas_cumprod_;
  DdimCoefficients c;
  c.t = t;
  c.t_prev = t_prev;
  c.alpha_t = ac[static_cast<std::size_t>(t)];
  c.alpha_prev = t_prev >= 0 ? ac[static_cast<std::size_t>(t_prev)]
                             : (options.set_alpha_to_one.value_or(config_.set_alpha_to_one) ? 1.0 : ac[0]);
  const double a_t = c.alpha_t;
  const double a_prev = c.alpha_prev;

  if (a_t == 0.0 && config_.prediction_type == PredictionType::Epsilon)
    invalid("alpha-bar at timestep " + std::to_string(t) +
            " is 0 (zero terminal SNR): an epsilon-prediction model cannot predict x0 there; use a v_prediction "
            "model or start below timestep " + std::to_string(t));
  if (a_t == 1.0 && (config_.prediction_type == PredictionType::Sample || options.use_clipped_model_output))
    invalid("alpha-bar at timestep " + std::to_string(t) +
            " is 1: the noise cannot be recovered from x0 there (sample prediction or use_clipped_model_output)");

  double sigma = 0.0;
  if (options.eta > 0.0 && 1.0 - a_t != 0.0) {
    if (!(a_prev > 0.0 && a_prev >= a_t))
      invalid("alpha-bar rises from timestep " + std::to_string(t_prev) + " (" + num(a_prev) + ") to " +
              std::to_string(t) + " (" + num(a_t) + "): sigma is undefined for eta > 0");
    const double variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
    sigma = options.eta * std::sqrt(std::max(0.0, variance));
  }
  c.sigma = sigma;
  c.dir = std::sqrt(std::max(0.0, 1.0 - a_prev - sigma * sigma));
  return c;
}

std::vector<DdimCoefficients> Scheduler::coefficients(std::span<const int> ts, const StepOptions& options) const {
  std::vector<DdimCoefficients> out;
  out.reserve(ts.size());
  for (std::size_t i = 0; i < ts.size(); ++i)
    out.push_back(step_coefficients(ts[i], i + 1 < ts.size() ? ts[i + 1] : -1, options));
  return out;
}

}  // namespace ddim
