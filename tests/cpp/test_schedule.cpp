// Noise schedules, timestep spacings and DDIM coefficients (engine/schedule/schedule.cpp).
// Expected timesteps are diffusers' DDIMScheduler.set_timesteps (numpy arithmetic) and the DDIM
// paper's code; alpha-bar values are recomputed here from independent closed forms.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include "ddim/error.hpp"
#include "ddim/schedule.hpp"
#include "test_util.hpp"

using ddim::BetaSchedule;
using ddim::PredictionType;
using ddim::ScheduleConfig;
using ddim::Scheduler;
using ddim::Spacing;
using ddim::StepOptions;

namespace {

std::vector<int> steps(const Scheduler& s, int n, Spacing sp, std::optional<int> offset = std::nullopt) {
  return s.timesteps(n, sp, offset).timesteps;
}

bool strictly_decreasing_in_range(const std::vector<int>& ts, int T) {
  for (std::size_t i = 0; i < ts.size(); ++i) {
    if (ts[i] < 0 || ts[i] >= T) return false;
    if (i > 0 && ts[i] >= ts[i - 1]) return false;
  }
  return true;
}

using ddim::test::contains;
using ddim::test::error_of;

StepOptions with_eta(double eta) {
  StepOptions o;
  o.eta = eta;
  return o;
}

}  // namespace

TEST_CASE("schedule: enum spellings round-trip and unknown spellings list the accepted ones") {
  for (auto v : {BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredCosCapV2})
    CHECK(ddim::parse_beta_schedule(ddim::to_string(v)) == v);
  for (auto v : {PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample})
    CHECK(ddim::parse_prediction_type(ddim::to_string(v)) == v);
  for (auto v : {Spacing::Leading, Spacing::Trailing, Spacing::Linspace, Spacing::Uniform, Spacing::Quadratic,
                 Spacing::Log})
    CHECK(ddim::parse_spacing(ddim::to_string(v)) == v);
  using ddim::VarianceType;
  for (auto v : {VarianceType::FixedSmall, VarianceType::FixedSmallLog, VarianceType::FixedLarge,
                 VarianceType::FixedLargeLog, VarianceType::Learned, VarianceType::LearnedRange})
    CHECK(ddim::parse_variance_type(ddim::to_string(v)) == v);

  CHECK(std::string(ddim::to_string(BetaSchedule::ScaledLinear)) == "scaled_linear");
  CHECK(std::string(ddim::to_string(BetaSchedule::SquaredCosCapV2)) == "squaredcos_cap_v2");
  CHECK(std::string(ddim::to_string(PredictionType::VPrediction)) == "v_prediction");
  CHECK(std::string(ddim::to_string(Spacing::Custom)) == "custom");
  CHECK(std::string(ddim::to_string(ddim::VarianceType::LearnedRange)) == "learned_range");

  const std::string e1 = error_of([] { ddim::parse_beta_schedule("cosine"); });
  CHECK(contains(e1, "cosine"));
  CHECK(contains(e1, "linear, scaled_linear, squaredcos_cap_v2"));
  CHECK(contains(error_of([] { ddim::parse_prediction_type("v-prediction"); }), "epsilon, v_prediction, sample"));
  CHECK(contains(error_of([] { ddim::parse_spacing("custom"); }), "leading, trailing, linspace"));
  CHECK(contains(error_of([] { ddim::parse_variance_type("small"); }), "fixed_small, fixed_small_log"));
}

TEST_CASE("schedule: config validation names the field") {
  CHECK_NOTHROW(ScheduleConfig{}.validate());
  const auto bad = [](auto mutate, const char* field) {
    ScheduleConfig c;
    mutate(c);
    CHECK_MESSAGE(contains(error_of([&] { c.validate(); }), field), field);
    CHECK_THROWS_AS(Scheduler{c}, ddim::Error);
  };
  bad([](ScheduleConfig& c) { c.num_train_timesteps = 0; }, "num_train_timesteps");
  bad([](ScheduleConfig& c) { c.beta_start = 0; }, "beta_start");
  bad([](ScheduleConfig& c) { c.beta_end = 1.0; }, "beta_end");
  bad([](ScheduleConfig& c) { c.beta_start = 0.03; }, "beta_start");  // above beta_end
  bad([](ScheduleConfig& c) { c.beta_schedule = BetaSchedule::ScaledLinear, c.beta_end = NAN; }, "beta_end");
  bad([](ScheduleConfig& c) { c.alphas_cumprod = {0.9, 0.5}; }, "alphas_cumprod has 2 entries");
  bad([](ScheduleConfig& c) { c.num_train_timesteps = 3, c.alphas_cumprod = {0.9, 0.0, 0.5}; }, "alphas_cumprod[1]");
  bad([](ScheduleConfig& c) { c.num_train_timesteps = 3, c.alphas_cumprod = {0.9, INFINITY, 0.5}; }, "alphas_cumprod[1]");
  bad([](ScheduleConfig& c) { c.num_train_timesteps = 2, c.alphas_cumprod = {1.5, 0.5}; }, "alphas_cumprod[0]");
  bad([](ScheduleConfig& c) { c.clip_sample_range = 0; }, "clip_sample_range");
  bad([](ScheduleConfig& c) { c.dynamic_thresholding_ratio = 0; }, "dynamic_thresholding_ratio");
  bad([](ScheduleConfig& c) { c.dynamic_thresholding_ratio = 1.5; }, "dynamic_thresholding_ratio");
  bad([](ScheduleConfig& c) { c.sample_max_value = 0; }, "sample_max_value");
  bad([](ScheduleConfig& c) { c.steps_offset = -1; }, "steps_offset");
  bad([](ScheduleConfig& c) { c.num_train_timesteps = 1, c.rescale_betas_zero_snr = true; }, "rescale_betas_zero_snr");

  // Not required: a monotone table; betas are unused when the table is given.
  ScheduleConfig ok;
  ok.num_train_timesteps = 3;
  ok.alphas_cumprod = {0.9, 0.95, 0.5};
  ok.beta_start = -1;
  CHECK_NOTHROW(ok.validate());
  ScheduleConfig cosine;
  cosine.beta_schedule = BetaSchedule::SquaredCosCapV2;
  cosine.beta_start = 0;  // unused by the cosine schedule
  CHECK_NOTHROW(cosine.validate());
}

TEST_CASE("timesteps: diffusers documented values at T 1000 and S 10") {
  const Scheduler s{ScheduleConfig{}};
  CHECK(steps(s, 10, Spacing::Leading) == std::vector<int>{900, 800, 700, 600, 500, 400, 300, 200, 100, 0});
  CHECK(steps(s, 10, Spacing::Trailing) == std::vector<int>{999, 899, 799, 699, 599, 499, 399, 299, 199, 99});
  CHECK(steps(s, 10, Spacing::Linspace) == std::vector<int>{999, 888, 777, 666, 555, 444, 333, 222, 111, 0});
  const auto plan = s.timesteps(10);  // the config's spacing: leading
  CHECK(plan.requested == 10);
  CHECK(plan.warning.empty());
  CHECK(plan.timesteps.front() == 900);
}

TEST_CASE("timesteps: numpy arithmetic with round half to even and float arange") {
  const Scheduler s{ScheduleConfig{}};
  CHECK(steps(s, 3, Spacing::Linspace) == std::vector<int>{999, 500, 0});  // 499.5 -> 500
  CHECK(steps(s, 3, Spacing::Trailing) == std::vector<int>{999, 666, 332});
  CHECK(steps(s, 7, Spacing::Trailing) == std::vector<int>{999, 856, 713, 570, 428, 285, 142});
  CHECK(steps(s, 7, Spacing::Linspace) == std::vector<int>{999, 832, 666, 500, 333, 166, 0});
  ScheduleConfig c6;
  c6.num_train_timesteps = 6;
  CHECK(steps(Scheduler{c6}, 3, Spacing::Linspace) == std::vector<int>{5, 2, 0});  // 2.5 -> 2
  ScheduleConfig c5;
  c5.num_train_timesteps = 5;
  CHECK(steps(Scheduler{c5}, 2, Spacing::Trailing) == std::vector<int>{4, 1});  // round(2.5) - 1
  // np.arange(50, 0, -50/29) has 30 entries, the last ~ -3.6e-14 (timestep -1): dropped.
  ScheduleConfig c50;
  c50.num_train_timesteps = 50;
  const auto plan = Scheduler{c50}.timesteps(29, Spacing::Trailing);
  CHECK(plan.timesteps == std::vector<int>{49, 47, 46, 44, 42, 40, 39, 37, 35, 33, 32, 30, 28, 27, 25,
                                           23, 21, 20, 18, 16, 15, 13, 11, 9,  8,  6,  4,  2,  1});
  CHECK(plan.warning.empty());
}

TEST_CASE("timesteps: steps_offset is added by leading only as in diffusers") {
  ScheduleConfig c;
  c.steps_offset = 1;
  const Scheduler s{c};
  CHECK(steps(s, 5, Spacing::Leading) == std::vector<int>{801, 601, 401, 201, 1});
  CHECK(steps(s, 10, Spacing::Linspace) == std::vector<int>{999, 888, 777, 666, 555, 444, 333, 222, 111, 0});
  CHECK(steps(s, 10, Spacing::Trailing).front() == 999);
  CHECK(steps(s, 5, Spacing::Leading, 0) == std::vector<int>{800, 600, 400, 200, 0});  // override
  CHECK(steps(s, 5, Spacing::Leading, 199) == std::vector<int>{999, 799, 599, 399, 199});
  CHECK(contains(error_of([&] { s.timesteps(5, Spacing::Leading, 200); }), "1000"));
  CHECK(contains(error_of([&] { s.timesteps(1000, Spacing::Leading); }), "steps_offset"));  // 999 + 1
  CHECK_THROWS_AS(s.timesteps(5, Spacing::Leading, -1), ddim::Error);
}

TEST_CASE("timesteps: the DDIM paper quadratic and uniform spacings") {
  const Scheduler s{ScheduleConfig{}};
  // [int(x) for x in np.linspace(0, sqrt(800), 10) ** 2] = 0, 9, 39, 88, 158, 246, 355, 483, 632, 800
  CHECK(steps(s, 10, Spacing::Quadratic) == std::vector<int>{800, 632, 483, 355, 246, 158, 88, 39, 9, 0});
  CHECK(s.timesteps(10, Spacing::Quadratic).warning.empty());
  // S = 100 repeats small timesteps (0, 0, 0, 0, 1, 2, ...): 96 distinct.
  const auto q100 = s.timesteps(100, Spacing::Quadratic);
  CHECK(q100.timesteps.size() == 96);
  CHECK(q100.requested == 100);
  CHECK(q100.warning == "spacing quadratic with 100 steps gives 96 distinct timesteps; using 96");
  CHECK(strictly_decreasing_in_range(q100.timesteps, 1000));
  CHECK(q100.timesteps.front() == 800);
  CHECK(q100.timesteps.back() == 0);

  // range(0, 1000, 1000 // 30 = 33): 0, 33, ..., 990: 31 entries.
  const auto u30 = s.timesteps(30, Spacing::Uniform);
  CHECK(u30.timesteps.size() == 31);
  CHECK(u30.timesteps.front() == 990);
  CHECK(u30.timesteps.back() == 0);
  CHECK(u30.warning == "spacing uniform with 30 steps gives 31 distinct timesteps; using 31");
  const auto u10 = s.timesteps(10, Spacing::Uniform);
  CHECK(u10.timesteps == std::vector<int>{900, 800, 700, 600, 500, 400, 300, 200, 100, 0});
  CHECK(u10.warning.empty());
}

TEST_CASE("timesteps: log spacing is geometric between 1 and T-1 and deduplicated") {
  const Scheduler s{ScheduleConfig{}};
  for (int S : {1, 2, 5, 10, 50, 200, 1000}) {
    CAPTURE(S);
    // Independent: t_i = nearest integer (ties to even) to 999^(i / (S-1)).
    std::vector<int> expect;
    for (int i = S - 1; i >= 0; --i) {
      const double v = S == 1 ? 999.0 : std::pow(999.0, static_cast<double>(i) / (S - 1));
      const int t = static_cast<int>(std::nearbyint(v));
      if (expect.empty() || expect.back() != t) expect.push_back(t);
    }
    const auto plan = s.timesteps(S, Spacing::Log);
    CHECK(plan.timesteps == expect);
    CHECK(plan.timesteps.front() == 999);
    CHECK(strictly_decreasing_in_range(plan.timesteps, 1000));
    CHECK(plan.warning.empty() == (static_cast<int>(expect.size()) == S));
  }
  CHECK(steps(s, 2, Spacing::Log) == std::vector<int>{999, 1});
  const auto big = s.timesteps(1000, Spacing::Log);
  CHECK(big.timesteps.size() < 1000);
  CHECK(contains(big.warning, "spacing log with 1000 steps gives "));
}

TEST_CASE("timesteps: step-count limits and S = T") {
  const Scheduler s{ScheduleConfig{}};
  const std::string e0 = error_of([&] { s.timesteps(0); });
  CHECK(contains(e0, "0"));
  CHECK(contains(e0, "1000"));
  const std::string e1 = error_of([&] { s.timesteps(1001); });
  CHECK(contains(e1, "1001"));
  CHECK(contains(e1, "1000"));
  CHECK_THROWS_AS(s.timesteps(-3), ddim::Error);
  CHECK_THROWS_AS(s.timesteps(10, Spacing::Custom), ddim::Error);

  std::vector<int> all(1000);
  for (int i = 0; i < 1000; ++i) all[static_cast<std::size_t>(i)] = 999 - i;
  for (Spacing sp : {Spacing::Leading, Spacing::Trailing, Spacing::Linspace, Spacing::Uniform}) {
    CAPTURE(ddim::to_string(sp));
    const auto plan = s.timesteps(1000, sp);
    CHECK(plan.timesteps == all);
    CHECK(plan.warning.empty());
  }
  for (Spacing sp : {Spacing::Quadratic, Spacing::Log}) {
    const auto plan = s.timesteps(1000, sp);
    CHECK(strictly_decreasing_in_range(plan.timesteps, 1000));
    CHECK_FALSE(plan.warning.empty());
  }
  // S = 1.
  CHECK(steps(s, 1, Spacing::Leading) == std::vector<int>{0});
  CHECK(steps(s, 1, Spacing::Trailing) == std::vector<int>{999});
  CHECK(steps(s, 1, Spacing::Linspace) == std::vector<int>{0});
  CHECK(steps(s, 1, Spacing::Uniform) == std::vector<int>{0});
  CHECK(steps(s, 1, Spacing::Quadratic) == std::vector<int>{0});
  CHECK(steps(s, 1, Spacing::Log) == std::vector<int>{999});
}

TEST_CASE("timesteps: every spacing is strictly decreasing and in range for many T and S") {
  for (int T : {1, 2, 3, 7, 10, 50, 100, 333, 1000}) {
    ScheduleConfig c;
    c.num_train_timesteps = T;
    const Scheduler s{c};
    for (int S = 1; S <= T; S += (T > 100 ? 7 : 1)) {
      for (Spacing sp : {Spacing::Leading, Spacing::Trailing, Spacing::Linspace, Spacing::Uniform,
                         Spacing::Quadratic, Spacing::Log}) {
        CAPTURE(T);
        CAPTURE(S);
        CAPTURE(ddim::to_string(sp));
        const auto plan = s.timesteps(S, sp);
        REQUIRE_FALSE(plan.timesteps.empty());
        CHECK(strictly_decreasing_in_range(plan.timesteps, T));
        CHECK(plan.requested == S);
        CHECK(plan.warning.empty() == (static_cast<int>(plan.timesteps.size()) == S));
        if (sp == Spacing::Leading || sp == Spacing::Trailing || sp == Spacing::Linspace)
          CHECK(static_cast<int>(plan.timesteps.size()) == S);
      }
    }
  }
}

TEST_CASE("timesteps: custom lists") {
  const Scheduler s{ScheduleConfig{}};
  const auto plan = s.custom_timesteps({999, 500, 20, 0});
  CHECK(plan.timesteps == std::vector<int>{999, 500, 20, 0});
  CHECK(plan.requested == 4);
  CHECK(plan.warning.empty());
  CHECK(s.custom_timesteps({5}).timesteps == std::vector<int>{5});
  CHECK(contains(error_of([&] { s.custom_timesteps({}); }), "empty"));
  CHECK(contains(error_of([&] { s.custom_timesteps({1000, 5}); }), "entry 0 (1000)"));
  CHECK(contains(error_of([&] { s.custom_timesteps({999, -1}); }), "entry 1 (-1)"));
  CHECK(contains(error_of([&] { s.custom_timesteps({999, 500, 500}); }), "entry 2 (500)"));
  CHECK(contains(error_of([&] { s.custom_timesteps({10, 20}); }), "strictly decreasing"));
}

TEST_CASE("alphas_cumprod: linear and scaled_linear and squaredcos_cap_v2 against closed forms") {
  SUBCASE("linear 1e-4 .. 0.02") {
    const Scheduler s{ScheduleConfig{}};
    const auto& ac = s.alphas_cumprod();
    REQUIRE(ac.size() == 1000);
    CHECK(ac[0] == doctest::Approx(1 - 1e-4).epsilon(1e-15));
    double prod = 1.0;
    for (int t = 0; t < 1000; ++t) {
      const double beta = 1e-4 + (0.02 - 1e-4) * t / 999.0;
      prod *= 1.0 - beta;
      if (t % 97 == 0 || t == 999) CHECK(ac[static_cast<std::size_t>(t)] == doctest::Approx(prod).epsilon(1e-12));
    }
    // ln ac[999] = sum ln(1 - beta_i): about -10.12, ac ~ 4.04e-5.
    CHECK(ac[999] == doctest::Approx(4.0358e-5).epsilon(1e-3));
    CHECK(ac[500] == doctest::Approx(0.07780).epsilon(1e-3));
  }
  SUBCASE("scaled_linear 0.00085 .. 0.012 (Stable Diffusion)") {
    ScheduleConfig c;
    c.beta_schedule = BetaSchedule::ScaledLinear;
    c.beta_start = 0.00085;
    c.beta_end = 0.012;
    const Scheduler s{c};
    double prod = 1.0;
    for (int t = 0; t < 1000; ++t) {
      const double r = std::sqrt(0.00085) + (std::sqrt(0.012) - std::sqrt(0.00085)) * t / 999.0;
      prod *= 1.0 - r * r;
      if (t % 101 == 0 || t == 999)
        CHECK(s.alphas_cumprod()[static_cast<std::size_t>(t)] == doctest::Approx(prod).epsilon(1e-12));
    }
    CHECK(s.alphas_cumprod()[0] == doctest::Approx(1 - 0.00085).epsilon(1e-15));
    CHECK(s.alphas_cumprod()[999] == doctest::Approx(0.00466).epsilon(1e-3));
  }
  SUBCASE("squaredcos_cap_v2: telescoping alpha-bar ratio below the 0.999 cap") {
    ScheduleConfig c;
    c.beta_schedule = BetaSchedule::SquaredCosCapV2;
    const Scheduler s{c};
    const auto& ac = s.alphas_cumprod();
    const double pi = 3.14159265358979323846;
    const auto f = [&](double t) { return std::pow(std::cos((t + 0.008) / 1.008 * pi / 2), 2); };
    for (int t : {0, 1, 10, 250, 500, 750, 900, 990}) {
      CAPTURE(t);
      CHECK(ac[static_cast<std::size_t>(t)] == doctest::Approx(f((t + 1) / 1000.0) / f(0)).epsilon(1e-10));
    }
    // The last beta is capped at 0.999: ac[999] = ac[998] * 0.001.
    CHECK(ac[999] == doctest::Approx(ac[998] * 0.001).epsilon(1e-12));
    for (std::size_t t = 1; t < ac.size(); ++t) CHECK(ac[t] < ac[t - 1]);
  }
  SUBCASE("an explicit table is used as is") {
    ScheduleConfig c;
    c.num_train_timesteps = 4;
    c.alphas_cumprod = {0.99, 0.7, 0.3, 0.01};
    CHECK(Scheduler{c}.alphas_cumprod() == c.alphas_cumprod);
  }
}

TEST_CASE("alphas_cumprod: rescale_betas_zero_snr") {
  ScheduleConfig base;
  base.beta_schedule = BetaSchedule::ScaledLinear;
  base.beta_start = 0.00085;
  base.beta_end = 0.012;
  ScheduleConfig zc = base;
  zc.rescale_betas_zero_snr = true;
  const Scheduler plain{base};
  const Scheduler zero{zc};
  const auto& a = plain.alphas_cumprod();
  const auto& z = zero.alphas_cumprod();
  CHECK(z[999] == 0.0);
  CHECK(std::sqrt(z[0]) == doctest::Approx(std::sqrt(a[0])).epsilon(1e-14));
  // sqrt(alpha-bar) is an affine map of the original: (s - s_T) * s_0 / (s_0 - s_T).
  const double s0 = std::sqrt(a[0]);
  const double sT = std::sqrt(a[999]);
  for (int t : {1, 100, 500, 900, 998}) {
    const double expect = (std::sqrt(a[static_cast<std::size_t>(t)]) - sT) * s0 / (s0 - sT);
    CHECK(std::sqrt(z[static_cast<std::size_t>(t)]) == doctest::Approx(expect).epsilon(1e-12));
  }
  // Idempotent on an already rescaled table (an exporter's table).
  ScheduleConfig table;
  table.alphas_cumprod = z;
  table.alphas_cumprod[999] = 1e-300;  // explicit tables must be > 0
  table.rescale_betas_zero_snr = true;
  const Scheduler again{table};
  CHECK(again.alphas_cumprod()[999] == 0.0);
  CHECK(again.alphas_cumprod()[500] == doctest::Approx(z[500]).epsilon(1e-12));

  // A zero alpha-bar: epsilon prediction cannot step from there; v prediction can.
  const std::vector<int> ts = zero.timesteps(10, Spacing::Trailing).timesteps;
  CHECK(ts.front() == 999);
  CHECK(contains(error_of([&] { zero.coefficients(ts, StepOptions{}); }), "epsilon"));
  zc.prediction_type = PredictionType::VPrediction;
  const auto co = Scheduler{zc}.coefficients(ts, StepOptions{});
  CHECK(co[0].alpha_t == 0.0);
  CHECK(std::isfinite(co[0].dir));
}

TEST_CASE("coefficients: DDIM sigma and direction and the final alpha") {
  const Scheduler s{ScheduleConfig{}};
  const auto& ac = s.alphas_cumprod();
  const auto beta = [](int t) { return 1e-4 + (0.02 - 1e-4) * t / 999.0; };

  SUBCASE("eta = 1 between neighbours is the DDPM posterior std sqrt(beta_tilde)") {
    StepOptions o;
    o.eta = 1.0;
    for (int t : {1, 2, 10, 500, 999}) {
      CAPTURE(t);
      const auto c = s.step_coefficients(t, t - 1, o);
      const double beta_tilde = (1 - ac[static_cast<std::size_t>(t - 1)]) / (1 - ac[static_cast<std::size_t>(t)]) * beta(t);
      CHECK(c.sigma == doctest::Approx(std::sqrt(beta_tilde)).epsilon(1e-9));
      CHECK(c.alpha_prev + c.sigma * c.sigma + c.dir * c.dir == doctest::Approx(1.0).epsilon(1e-12));
    }
  }
  SUBCASE("a plan") {
    const std::vector<int> ts{999, 499, 0};
    StepOptions o;
    o.eta = 0.5;
    const auto co = s.coefficients(ts, o);
    REQUIRE(co.size() == 3);
    for (std::size_t i = 0; i < 3; ++i) {
      const double at = ac[static_cast<std::size_t>(ts[i])];
      const double ap = i + 1 < 3 ? ac[static_cast<std::size_t>(ts[i + 1])] : 1.0;
      CHECK(co[i].t == ts[i]);
      CHECK(co[i].t_prev == (i + 1 < 3 ? ts[i + 1] : -1));
      CHECK(co[i].alpha_t == at);
      CHECK(co[i].alpha_prev == ap);
      const double sigma = 0.5 * std::sqrt((1 - ap) / (1 - at)) * std::sqrt(1 - at / ap);
      CHECK(co[i].sigma == doctest::Approx(sigma).epsilon(1e-12));
      CHECK(co[i].dir == doctest::Approx(std::sqrt(1 - ap - sigma * sigma)).epsilon(1e-12));
    }
    CHECK(co[2].sigma == 0.0);  // to alpha-bar 1: no noise
    CHECK(co[2].dir == 0.0);
    // eta = 0: deterministic, dir = sqrt(1 - a_prev).
    const auto c0 = s.coefficients(ts, StepOptions{});
    CHECK(c0[0].sigma == 0.0);
    CHECK(c0[0].dir == doctest::Approx(std::sqrt(1 - ac[499])).epsilon(1e-14));
    CHECK(s.coefficients(std::span<const int>{}, o).empty());
  }
  SUBCASE("the final step: set_alpha_to_one on / off, config and option") {
    StepOptions o;
    CHECK(s.step_coefficients(100, -1, o).alpha_prev == 1.0);
    o.set_alpha_to_one = false;
    CHECK(s.step_coefficients(100, -1, o).alpha_prev == ac[0]);
    ScheduleConfig c;
    c.set_alpha_to_one = false;
    const Scheduler s2{c};
    CHECK(s2.step_coefficients(100, -1, StepOptions{}).alpha_prev == ac[0]);
    StepOptions on;
    on.set_alpha_to_one = true;
    CHECK(s2.step_coefficients(100, -1, on).alpha_prev == 1.0);
    const auto c0 = s2.step_coefficients(1, -1, with_eta(1.0));
    CHECK(c0.sigma == doctest::Approx(std::sqrt((1 - ac[0]) / (1 - ac[1]) * (1 - ac[1] / ac[0]))).epsilon(1e-12));
  }
  SUBCASE("errors") {
    CHECK(contains(error_of([&] { s.step_coefficients(500, 400, with_eta(-0.1)); }), "eta"));
    CHECK(contains(error_of([&] { s.step_coefficients(1000, 400, StepOptions{}); }), "1000"));
    CHECK(contains(error_of([&] { s.step_coefficients(-1, -1, StepOptions{}); }), "-1"));
    CHECK(contains(error_of([&] { s.step_coefficients(400, 400, StepOptions{}); }), "400"));
    CHECK(contains(error_of([&] { s.step_coefficients(400, -2, StepOptions{}); }), "-2"));
    const std::vector<int> rising{100, 200};
    CHECK_THROWS_AS(s.coefficients(rising, StepOptions{}), ddim::Error);
    ScheduleConfig one;
    one.num_train_timesteps = 2;
    one.alphas_cumprod = {1.0, 0.5};
    one.prediction_type = PredictionType::Sample;
    CHECK(contains(error_of([&] { Scheduler{one}.step_coefficients(0, -1, StepOptions{}); }), "is 1"));
  }
}
