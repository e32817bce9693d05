// ddim::Scheduler::step (engine/schedule/ddim_step.cpp, kernels/ddim_step.h) against an
// independent double-precision rewrite of diffusers' DDIMScheduler.step.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "ddim/error.hpp"
#include "ddim/schedule.hpp"
#include "schedule/ddim_params.hpp"
#include "test_util.hpp"

using ddim::PredictionType;
using ddim::ScheduleConfig;
using ddim::Scheduler;
using ddim::StepOptions;

namespace {

// diffusers' DDIMScheduler.step (and _threshold_sample, _get_variance) in double, written from
// the paper's formulas: x0 from the parameterisation, threshold or clip, sigma, direction, noise.
struct RefResult {
  std::vector<double> prev;
  std::vector<double> x0;
};

RefResult reference_step(const ScheduleConfig& cfg, const std::vector<double>& ac, const std::vector<float>& out,
                         const std::vector<float>& x, std::size_t batch, int t, int t_prev, const StepOptions& o,
                         const std::vector<float>& noise) {
  const std::size_t n = x.size();
  const std::size_t per = n / batch;
  const double a_t = ac[static_cast<std::size_t>(t)];
  const bool alpha_one = o.set_alpha_to_one.value_or(cfg.set_alpha_to_one);
  const double a_prev = t_prev >= 0 ? ac[static_cast<std::size_t>(t_prev)] : (alpha_one ? 1.0 : ac[0]);
  const double b_t = 1 - a_t;
  RefResult r;
  r.prev.resize(n);
  r.x0.resize(n);
  std::vector<double> eps(n);
  for (std::size_t i = 0; i < n; ++i) {
    const double xi = x[i], oi = out[i];
    switch (cfg.prediction_type) {
      case PredictionType::Epsilon:
        r.x0[i] = (xi - std::sqrt(b_t) * oi) / std::sqrt(a_t);
        eps[i] = oi;
        break;
      case PredictionType::Sample:
        r.x0[i] = oi;
        eps[i] = (xi - std::sqrt(a_t) * oi) / std::sqrt(b_t);
        break;
      case PredictionType::VPrediction:
        r.x0[i] = std::sqrt(a_t) * xi - std::sqrt(b_t) * oi;
        eps[i] = std::sqrt(a_t) * oi + std::sqrt(b_t) * xi;
        break;
    }
  }
  if (cfg.thresholding) {
    for (std::size_t b = 0; b < batch; ++b) {
      std::vector<double> a(per);
      for (std::size_t i = 0; i < per; ++i) a[i] = std::abs(r.x0[b * per + i]);
      std::sort(a.begin(), a.end());
      const double pos = cfg.dynamic_thresholding_ratio * static_cast<double>(per - 1);
      const std::size_t lo = static_cast<std::size_t>(std::floor(pos));
      const std::size_t hi = static_cast<std::size_t>(std::ceil(pos));
      const double q = a[lo] + (a[hi] - a[lo]) * (pos - static_cast<double>(lo));
      const double s = std::min(std::max(q, 1.0), cfg.sample_max_value);
      for (std::size_t i = 0; i < per; ++i) r.x0[b * per + i] = std::clamp(r.x0[b * per + i], -s, s) / s;
    }
  } else if (o.clip_sample.value_or(cfg.clip_sample)) {
    for (double& v : r.x0) v = std::clamp(v, -cfg.clip_sample_range, cfg.clip_sample_range);
  }
  const double variance = (1 - a_prev) / b_t * (1 - a_t / a_prev);
  const double std_dev = o.eta * std::sqrt(variance);
  for (std::size_t i = 0; i < n; ++i) {
    if (o.use_clipped_model_output) eps[i] = (x[i] - std::sqrt(a_t) * r.x0[i]) / std::sqrt(b_t);
    r.prev[i] = std::sqrt(a_prev) * r.x0[i] + std::sqrt(1 - a_prev - std_dev * std_dev) * eps[i];
    if (o.eta > 0) r.prev[i] += std_dev * noise[i];
  }
  return r;
}

std::vector<float> randn(std::size_t n, std::mt19937& rng, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<float> v(n);
  for (float& f : v) f = static_cast<float>(d(rng));
  return v;
}

using ddim::test::contains;
using ddim::test::error_of;

}  // namespace

TEST_CASE("ddim step: matches a double rewrite of diffusers step for every parameterisation and option") {
  enum Clip { kNone, kRange, kThreshold };
  const std::size_t batch = 3, per = 257, n = batch * per;
  std::mt19937 rng(1234);
  int clipped_x0_seen = 0;
  double worst = 0;
  for (PredictionType pred : {PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample}) {
    for (Clip clip : {kNone, kRange, kThreshold}) {
      ScheduleConfig cfg;
      cfg.prediction_type = pred;
      cfg.clip_sample = clip == kRange;
      cfg.clip_sample_range = 1.5;
      cfg.thresholding = clip == kThreshold;
      cfg.dynamic_thresholding_ratio = 0.9;
      cfg.sample_max_value = 2.5;
      cfg.set_alpha_to_one = pred != PredictionType::Sample;
      const Scheduler s{cfg};
      for (bool use_clipped : {false, true}) {
        for (double eta : {0.0, 0.8}) {
          for (const auto& tt : {std::pair{999, 899}, std::pair{500, 400}, std::pair{300, 1}, std::pair{20, -1}}) {
            const int t = tt.first, t_prev = tt.second;
            CAPTURE(ddim::to_string(pred));
            CAPTURE(static_cast<int>(clip));
            CAPTURE(use_clipped);
            CAPTURE(eta);
            CAPTURE(t);
            CAPTURE(t_prev);
            std::vector<float> x = randn(n, rng, 1.0);
            std::vector<float> out = randn(n, rng, pred == PredictionType::Sample ? 1.5 : 1.0);
            for (std::size_t i = per; i < n; ++i) out[i] *= 1.0f + static_cast<float>(i / per);  // per-sample scale
            const std::vector<float> noise = randn(n, rng, 1.0);
            StepOptions o;
            o.eta = eta;
            o.use_clipped_model_output = use_clipped;
            std::vector<float> prev(n), x0(n);
            s.step(out, t, t_prev, x, prev, batch, o, noise, x0);
            const RefResult ref = reference_step(cfg, s.alphas_cumprod(), out, x, batch, t, t_prev, o, noise);
            double max_err = 0;
            for (std::size_t i = 0; i < n; ++i) {
              const double tol_prev = 1e-5 * std::max(1.0, std::abs(ref.prev[i]));
              const double tol_x0 = 1e-5 * std::max(1.0, std::abs(ref.x0[i]));
              max_err = std::max(max_err, std::abs(prev[i] - ref.prev[i]) / tol_prev * 1e-5);
              if (std::abs(prev[i] - ref.prev[i]) > tol_prev || std::abs(x0[i] - ref.x0[i]) > tol_x0) {
                CAPTURE(i);
                CHECK(prev[i] == doctest::Approx(ref.prev[i]));
                CHECK(x0[i] == doctest::Approx(ref.x0[i]));
                break;
              }
              if (clip != kNone && std::abs(ref.x0[i]) >= (clip == kRange ? 1.5 : 1.0) * (1 - 1e-12)) ++clipped_x0_seen;
            }
            worst = std::max(worst, max_err);
          }
        }
      }
    }
  }
  MESSAGE("largest step error relative to max(1, |ref|): " << worst);
  CHECK(clipped_x0_seen > 1000);  // the clipping and thresholding paths were exercised
}

TEST_CASE("ddim step: in place with optional pred_x0 and per-sample thresholds") {
  ScheduleConfig cfg;
  cfg.prediction_type = PredictionType::Sample;
  cfg.thresholding = true;
  cfg.dynamic_thresholding_ratio = 0.995;
  cfg.sample_max_value = 3.0;
  const Scheduler s{cfg};
  std::mt19937 rng(7);
  const std::size_t batch = 2, per = 1000;
  const std::vector<float> x = randn(batch * per, rng, 1.0);
  std::vector<float> out = randn(batch * per, rng, 2.0);
  for (std::size_t i = per; i < 2 * per; ++i) out[i] *= 0.05f;  // second sample: |x0| < 1, s = 1
  std::vector<float> prev(batch * per), x0(batch * per);
  s.step(out, 700, 600, x, prev, batch, StepOptions{}, {}, x0);
  // First sample: quantile ~ 5.6 -> s = sample_max_value = 3: x0 = clamp(out, -3, 3) / 3.
  float max0 = 0;
  for (std::size_t i = 0; i < per; ++i) {
    CHECK(x0[i] == doctest::Approx(std::clamp(out[i], -3.f, 3.f) / 3.f));
    max0 = std::max(max0, std::abs(x0[i]));
  }
  CHECK(max0 == 1.0f);
  for (std::size_t i = per; i < 2 * per; ++i) CHECK(x0[i] == out[i]);  // s = 1: unchanged
  CHECK(ddim::dynamic_threshold(std::span<const float>(x0).first(per), 0.995, 3.0) == 1.0f);

  std::vector<float> inplace = x;
  s.step(out, 700, 600, inplace, inplace, batch, StepOptions{});
  CHECK(inplace == prev);
}

TEST_CASE("ddim step: dynamic_threshold is the linear torch.quantile clamped to 1..max") {
  const std::vector<float> v{0.5f, -2.f, 3.f, 1.5f, -4.f};  // |v| sorted: 0.5 1.5 2 3 4
  CHECK(ddim::dynamic_threshold(v, 0.5, 10.0) == 2.0f);
  CHECK(ddim::dynamic_threshold(v, 0.9, 10.0) == doctest::Approx(3.6f));  // rank 3.6
  CHECK(ddim::dynamic_threshold(v, 0.9, 3.0) == 3.0f);                      // max
  CHECK(ddim::dynamic_threshold(v, 0.1, 10.0) == 1.0f);                     // 0.9 -> min 1
  CHECK(ddim::dynamic_threshold(v, 1.0, 10.0) == 4.0f);
  CHECK(ddim::dynamic_threshold(v, 0.9, 0.5) == 0.5f);  // torch.clamp: max wins over min
  const std::vector<float> one{-7.f};
  CHECK(ddim::dynamic_threshold(one, 0.995, 10.0) == 7.0f);
  const std::vector<float> with_nan{1.f, NAN, 2.f};
  CHECK(std::isnan(ddim::dynamic_threshold(with_nan, 0.5, 10.0)));
  CHECK_THROWS_AS(ddim::dynamic_threshold(std::span<const float>{}, 0.5, 10.0), ddim::Error);
  CHECK_THROWS_AS(ddim::dynamic_threshold(v, 0.0, 10.0), ddim::Error);
  // 1000 values 1..1000: rank 0.995 * 999 = 994.005 -> 995.005.
  std::vector<float> ramp(1000);
  for (int i = 0; i < 1000; ++i) ramp[static_cast<std::size_t>(i)] = static_cast<float>(i % 2 ? i + 1 : -(i + 1));
  std::shuffle(ramp.begin(), ramp.end(), std::mt19937(3));
  CHECK(ddim::dynamic_threshold(ramp, 0.995, 2000.0) == doctest::Approx(995.005f));
}

TEST_CASE("ddim step: make_step_params rounds once and picks the clip mode as diffusers does") {
  ScheduleConfig cfg;
  cfg.clip_sample_range = 2.0;
  cfg.prediction_type = PredictionType::VPrediction;
  const Scheduler s{cfg};
  StepOptions o;
  o.eta = 0.3;
  const auto c = s.step_coefficients(600, 500, o);
  auto p = ddim::make_step_params(c, cfg, o);
  CHECK(p.sqrt_alpha_t == static_cast<float>(std::sqrt(c.alpha_t)));
  CHECK(p.sqrt_one_minus_alpha_t == static_cast<float>(std::sqrt(1 - c.alpha_t)));
  CHECK(p.sqrt_alpha_prev == static_cast<float>(std::sqrt(c.alpha_prev)));
  CHECK(p.dir == static_cast<float>(c.dir));
  CHECK(p.sigma == static_cast<float>(c.sigma));
  CHECK(p.sigma > 0.f);
  CHECK(p.clip_range == 2.0f);
  CHECK(p.prediction == ddim::kPredV);
  CHECK(p.t == 600);
  CHECK(p.clip == ddim::kClipRange);  // config default clip_sample = true
  CHECK(p.use_clipped_model_output == 0);
  o.clip_sample = false;
  CHECK(ddim::make_step_params(c, cfg, o).clip == ddim::kClipNone);
  cfg.thresholding = true;  // thresholding wins over clip_sample
  CHECK(ddim::make_step_params(c, cfg, o).clip == ddim::kClipThreshold);
  o.clip_sample = true;
  o.use_clipped_model_output = true;
  p = ddim::make_step_params(c, cfg, o);
  CHECK(p.clip == ddim::kClipThreshold);
  CHECK(p.use_clipped_model_output == 1);
}

TEST_CASE("ddim step: bad arguments are clear errors") {
  const Scheduler s{ScheduleConfig{}};
  std::vector<float> a(12, 0.1f), b(12, 0.2f), prev(12), small(11), z(12, 0.f);
  StepOptions o;
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 0, o); }), "batch"));
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 5, o); }), "multiple of batch 5"));
  CHECK(contains(error_of([&] { s.step(small, 500, 400, b, prev, 1, o); }), "model_output has 11"));
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, small, 1, o); }), "prev_sample has 11"));
  CHECK(contains(error_of([&] { s.step(a, 500, 400, small, small, 1, o); }), "model_output has 12"));
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 1, o, {}, small); }), "pred_x0 has 11"));
  CHECK(contains(error_of([&] { s.step(std::span<const float>{}, 500, 400, std::span<const float>{}, std::span<float>{}, 1, o); }),
                 "empty"));
  CHECK(contains(error_of([&] { s.step(a, 1000, 400, b, prev, 1, o); }), "1000"));
  CHECK(contains(error_of([&] { s.step(a, 400, 400, b, prev, 1, o); }), "400"));
  o.eta = 1.0;
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 2, o); }), "noise"));
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 2, o, small); }), "noise has 11"));
  CHECK_NOTHROW(s.step(a, 500, 400, b, prev, 2, o, z));
  CHECK_NOTHROW(s.step(a, 500, -1, b, prev, 2, o));  // to alpha-bar 1: sigma = 0, no noise needed
  o.eta = -1.0;
  CHECK(contains(error_of([&] { s.step(a, 500, 400, b, prev, 2, o, z); }), "eta"));
}
