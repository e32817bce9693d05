#pragma once
// The DDIM toolkit: deterministic DDIM inversion (Session::invert) and spherical interpolation of
// x_T (slerp), plus the seeded x_T that Session::sample starts from.
//
// ---- Inversion: the timestep sequences
// Let tau_0 > tau_1 > ... > tau_{S-1} be the timesteps that Session::sample visits for the same
// steps / spacing / timesteps (and the model's steps_offset), and alpha(-1) the sampler's final
// alpha-bar: 1 with set_alpha_to_one, else alpha-bar_0. Inversion starts from the clean x0 at the
// point "t = -1" and visits the sampling timesteps in reverse:
//   u_0 = -1, u_1 = tau_{S-1}, u_2 = tau_{S-2}, ..., u_S = tau_0,
// so step k (k = 0 .. S-1) maps x at u_k to x at u_{k+1}, and the result is x at tau_0: the x_T
// from which Session::sample with the same steps, spacing and eta = 0 returns (approximately) x0.
// Each step is the shared DDIM update with sigma = 0,
//   x0_pred = x0_pred(x, model output; a_src),  eps = eps(x, model output; a_src),
//   x_next  = sqrt(a_dst) x0_pred + sqrt(1 - a_dst) eps,
// with the model evaluated at timestep m_k:
//   ModelTime::Current  a_src = alpha(u_k), a_dst = alpha(u_{k+1}), m_k = u_k: the DDIM ODE step
//                       run backwards (explicit Euler from the current point). The first step has
//                       no model timestep of its own (u_0 = -1): it uses m_0 = tau_{S-1}, the
//                       timestep at which the last sampling step evaluated the model. No clipping.
//   ModelTime::Next     diffusers' DDIMInverseScheduler (set_timesteps + step): m_k = u_{k+1} (the
//                       destination), a_dst = alpha(u_{k+1}), a_src = alpha(s_k) with
//                       s_k = min(u_{k+1} - T / N, T - 1) (integer division, N the step count
//                       asked for) and alpha(s < 0) = its initial_alpha_cumprod (= alpha(-1)
//                       above). x0_pred is clipped to +-clip_sample_range when the model's
//                       schedule has clip_sample, as diffusers does; dynamic thresholding is not
//                       applied (DDIMInverseScheduler has none). diffusers itself offers only the
//                       leading and trailing spacings; other spacings here use the same rule.
// Inversion is exact only in the limit of many steps: the step from u_k to u_{k+1} would need
// the model output at the unknown destination point. InvertOptions::refine (Current only) solves
// for that point by fixed-point iteration: after the explicit step gives a guess y for x at
// u_{k+1}, each refinement evaluates the model at (y, u_{k+1}), converts its output to a noise
// prediction e at that point (a = alpha(u_{k+1}), the model's prediction type), and recomputes
//   y = sqrt(a_dst) (x - sqrt(1 - a_src) e) / sqrt(a_src) + sqrt(1 - a_dst) e
// from the same x at u_k. A fixed point y is exactly the x from which the sampler's step
// (model at y and u_{k+1}, no clipping) lands on x; each refinement costs one more forward pass
// per step and runs step by step through Session::forward. Sampling with clip_sample clamps x0
// predictions, which inversion does not undo; the round trip is closest with clip_sample off.
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ddim/schedule.hpp"
#include "ddim/session.hpp"

namespace ddim {

enum class ModelTime { Current, Next };
DDIM_API const char* to_string(ModelTime) noexcept;
DDIM_API ModelTime parse_model_time(const std::string&);  // "current", "next"

struct InvertOptions {
  int steps = 50;
  std::optional<Spacing> spacing;  // default: the model's timestep_spacing
  std::vector<int> timesteps;      // a custom list in SAMPLING order (strictly decreasing), as
                                   // SampleOptions::timesteps; overrides steps and spacing
  ModelTime model_time = ModelTime::Current;
  int refine = 0;                  // fixed-point refinements per step (Current only; 0 .. 100)
  ProgressCallback progress;       // (steps done, steps total) after every step; false cancels
  bool want_trajectory = false;    // x after each step, x0 first: (S+1, N, C, H, W)
  ClassConditioning conditioning;  // class labels and guidance (class-conditional models): every
                                   // model evaluation of the inversion uses them
};

struct InvertResult {
  std::vector<int> timesteps;        // u_1 .. u_S: the timesteps visited, ascending (the sampling
                                     // timesteps reversed); x_T is x at the last
  std::vector<int> model_timesteps;  // m_0 .. m_{S-1}: where the model was evaluated
  std::string warning;               // e.g. the spacing gave a different step count than asked
  std::vector<float> x_T;            // (N, C, H, W)
  std::vector<float> trajectory;     // when asked
};

// ---- DDPM ancestral sampling (Session::sample_ddpm), for comparison with DDIM
// All T training timesteps, t = T-1 down to 0, each step diffusers' DDPMScheduler.step with
// prev_t = t - 1 (a_t = alpha-bar_t, a_prev = alpha-bar_{t-1}, 1 at t = 0, beta_t = 1 - a_t / a_prev):
//   x0 = the model's x0 prediction (epsilon, v or sample), clipped to +-clip_sample_range
//        (clip_sample) or dynamically thresholded (the schedule's thresholding),
//   x_{t-1} = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(a_t / a_prev) (1 - a_prev) / (1 - a_t) x_t
//             + sigma_t z,   z unit normal, only for t > 0,
//   sigma_t^2 = max((1 - a_prev) / (1 - a_t) beta_t, 1e-20)  fixed_small (and fixed_small_log)
//             = beta_t                                        fixed_large.
// z of step s (s = 0 .. T-1, t = T-1-s) for sample i is Philox noise keyed by (seed + i,
// kNoiseStreamStep, s), as DDIM's per-step noise, or the caller's noise[s, i]. x_T as in sample().
struct DdpmOptions {
  std::uint64_t seed = 0;                 // sample i of the batch uses seed + i ...
  std::vector<std::uint64_t> seeds;       // ... unless given here, one per sample (N)
  std::span<const float> x_T;             // optional: (N, C, H, W) start; default from the seeds
  std::span<const float> noise;           // optional: (T, N, C, H, W) unit normal, per step (the
                                          // last slice, t = 0, is unused)
  std::optional<VarianceType> variance;   // FixedSmall or FixedLarge; default: the model's
                                          // variance_type (learned kinds: ErrorCode::Unsupported)
  std::optional<bool> clip_sample;        // default: the model's schedule
  bool want_trajectory = false;           // x_t after each step, x_T first: (T+1, N, C, H, W)
  bool want_x0 = false;                   // the x0 prediction of each step: (T, N, C, H, W)
  ProgressCallback progress;
};

// Spherical linear interpolation of two whole vectors (one sample's x_T each), in double:
//   theta = acos(clamp(<a, b> / (|a| |b|), -1, 1)),
//   slerp = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b,
// linear, (1 - t) a + t b, when sin(theta) < 1e-6 (parallel or antiparallel) or a norm is 0.
// t = 0 returns a and t = 1 returns b exactly (copies of the inputs). Throws
// ddim::Error(InvalidArgument) on sizes that differ, empty or non-finite inputs, or t outside [0, 1].
DDIM_API std::vector<float> slerp(std::span<const float> a, std::span<const float> b, double t);

// The initial x_T (count = C * H * W values) that Session::sample draws for a sample whose seed is
// `seed` (sample i of a batch uses seed + i): Philox normal noise, stream kNoiseStreamInitial.
DDIM_API std::vector<float> initial_noise(std::uint64_t seed, std::size_t count);

}  // namespace ddim
