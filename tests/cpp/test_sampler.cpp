// The sampler on the CPU backend: determinism, batch independence, noise handling, the loop
// against the public Scheduler driven by Session::forward, options and errors, end to end.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>

#include "ddim/ddim.hpp"
#include "kernels/philox.h"
#include "sampler/noise.hpp"
#include "test_util.hpp"

using namespace ddim;

namespace {

using test::bitwise_equal;

double max_abs_diff(std::span<const float> a, std::span<const float> b) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

constexpr std::size_t kE = 3 * 16 * 12;  // elements per sample of the tiny model

}  // namespace

TEST_CASE("sampler: eta = 0 is deterministic and the result is finite and not trivial") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 2);
  SampleOptions o;
  o.steps = 10;
  o.seed = 5;
  auto a = s->sample(o);
  auto b = s->sample(o);
  CHECK(a.timesteps.size() == 10);
  CHECK(bitwise_equal(a.images, b.images));
  double norm = 0;
  for (float v : a.images) {
    REQUIRE(std::isfinite(v));
    norm += double(v) * v;
  }
  CHECK(norm > 0.0);
  CHECK(max_abs_diff(std::span(a.images).first(kE), std::span(a.images).subspan(kE)) > 1e-3);  // two seeds
}

TEST_CASE("sampler: a sample is the same alone (batch 1) and at position 3 of a batch of 4") {
  auto model = test::tiny_model();
  for (double eta : {0.0, 1.0}) {
    SampleOptions o;
    o.steps = 8;
    o.eta = eta;
    o.seed = 100;
    auto batch4 = test::cpu_session(model, 4)->sample(o);
    o.seed = 103;
    auto alone = test::cpu_session(model, 1, 1)->sample(o);
    CHECK_MESSAGE(bitwise_equal(alone.images, std::span(batch4.images).subspan(3 * kE, kE)), "eta " << eta);
  }
}

TEST_CASE("sampler: per-sample seeds: a batch with seeds [9, 2, 5] equals three lone samples, DDIM and DDPM") {
  auto model = test::tiny_model();
  const std::vector<std::uint64_t> seeds{9, 2, 5};
  for (double eta : {0.0, 0.7}) {
    SampleOptions o;
    o.steps = 6;
    o.eta = eta;
    o.seeds = seeds;
    o.want_trajectory = true;
    const auto batch = test::cpu_session(model, 3)->sample(o);
    auto lone = test::cpu_session(model, 1, 1);
    for (std::size_t i = 0; i < seeds.size(); ++i) {
      SampleOptions one;
      one.steps = 6;
      one.eta = eta;
      one.seed = seeds[i];
      CHECK_MESSAGE(bitwise_equal(lone->sample(one).images, std::span(batch.images).subspan(i * kE, kE)), "eta " << eta << " seed " << seeds[i]);
      // x_T of sample i is initial_noise(seeds[i]).
      CHECK(bitwise_equal(initial_noise(seeds[i], kE), std::span(batch.trajectory).subspan(i * kE, kE)));
    }
  }
  // seed + i is the default: seeds {4, 5, 6} equals seed 4.
  SampleOptions by_seed;
  by_seed.steps = 4;
  by_seed.eta = 1.0;
  by_seed.seed = 4;
  SampleOptions by_list = by_seed;
  by_list.seed = 999;  // ignored when seeds are given
  by_list.seeds = {4, 5, 6};
  auto s3 = test::cpu_session(model, 3);
  CHECK(bitwise_equal(s3->sample(by_seed).images, s3->sample(by_list).images));
  // One seed per sample, or none.
  by_list.seeds = {1, 2};
  CHECK_THROWS_WITH_AS(s3->sample(by_list), doctest::Contains("one seed per sample"), Error);

  // DDPM: the same promise, on a 20-timestep schedule.
  ScheduleConfig sc;
  sc.num_train_timesteps = 20;
  auto short_model = test::tiny_model(1, sc);
  DdpmOptions d;
  d.seeds = {9, 2, 5};
  const auto ddpm_batch = test::cpu_session(short_model, 3)->sample_ddpm(d);
  auto ddpm_lone = test::cpu_session(short_model, 1, 1);
  for (std::size_t i = 0; i < 3; ++i) {
    DdpmOptions one;
    one.seed = d.seeds[i];
    CHECK(bitwise_equal(ddpm_lone->sample_ddpm(one).images, std::span(ddpm_batch.images).subspan(i * kE, kE)));
  }
  d.seeds = {1};
  CHECK_THROWS_WITH_AS(test::cpu_session(short_model, 3)->sample_ddpm(d), doctest::Contains("one seed per sample"), Error);
}

TEST_CASE("sampler: timestep_plan gives the timesteps sample() visits, before sampling") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 1);
  SampleOptions o;
  o.steps = 30;
  o.spacing = Spacing::Uniform;  // 31 distinct timesteps for 30 asked
  const TimestepPlan plan = s->timestep_plan(o);
  CHECK(plan.requested == 30);
  CHECK(plan.timesteps.size() == 31);
  CHECK_FALSE(plan.warning.empty());
  o.want_trajectory = true;
  o.want_x0 = true;
  const auto r = s->sample(o);
  CHECK(r.timesteps == plan.timesteps);
  CHECK(r.trajectory.size() == (plan.timesteps.size() + 1) * kE);
  CHECK(r.x0.size() == plan.timesteps.size() * kE);
  // Custom lists and the model's default spacing; the same errors as sample().
  SampleOptions custom;
  custom.timesteps = {900, 500, 20};
  CHECK(s->timestep_plan(custom).timesteps == custom.timesteps);
  CHECK(s->timestep_plan(SampleOptions{}).timesteps == Scheduler(model->schedule()).timesteps(50).timesteps);
  SampleOptions bad;
  bad.steps = 0;
  CHECK_THROWS_WITH_AS(s->timestep_plan(bad), doctest::Contains("steps"), Error);
  bad.steps = 5;
  bad.timesteps = {10, 20};
  CHECK_THROWS_AS(s->timestep_plan(bad), Error);
}

TEST_CASE("sampler: different seeds differ at eta > 0 even from the same x_T") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 1);
  std::vector<float> xT(kE);
  fill_normal(42, kNoiseStreamInitial, 0, xT);
  SampleOptions o;
  o.steps = 5;
  o.eta = 1.0;
  o.x_T = xT;
  o.seed = 1;
  auto a = s->sample(o);
  o.seed = 2;
  auto b = s->sample(o);
  CHECK(max_abs_diff(a.images, b.images) > 1e-3);
  o.eta = 0.0;  // at eta = 0 the seed only chooses x_T, which is given
  o.seed = 1;
  auto c = s->sample(o);
  o.seed = 2;
  auto d = s->sample(o);
  CHECK(bitwise_equal(c.images, d.images));
}

TEST_CASE("sampler: the loop equals Session::forward + Scheduler::step with the supplied noise, exactly") {
  auto model = test::tiny_model(7);
  const int N = 2, S = 6;
  auto s = test::cpu_session(model, N);
  std::vector<float> xT(N * kE), noise(S * N * kE);
  fill_normal(9, kNoiseStreamInitial, 0, xT);
  fill_normal(10, kNoiseStreamInitial, 0, noise);
  SampleOptions o;
  o.steps = S;
  o.eta = 0.7;
  o.x_T = xT;
  o.noise = noise;
  o.want_trajectory = true;
  o.want_x0 = true;
  auto r = s->sample(o);
  REQUIRE(r.timesteps.size() == std::size_t(S));
  REQUIRE(r.trajectory.size() == std::size_t(S + 1) * N * kE);
  REQUIRE(r.x0.size() == std::size_t(S) * N * kE);

  Scheduler sched(model->schedule());
  StepOptions so;
  so.eta = 0.7;
  std::vector<float> x = xT, prev(x.size()), x0(x.size());
  CHECK(bitwise_equal(std::span(r.trajectory).first(x.size()), x));
  for (int i = 0; i < S; ++i) {
    const int t = r.timesteps[i], t_prev = i + 1 < S ? r.timesteps[i + 1] : -1;
    std::vector<int> tv{t};
    auto eps = s->forward(x, tv);
    sched.step(eps, t, t_prev, x, prev, N, so, std::span(noise).subspan(std::size_t(i) * N * kE, N * kE), x0);
    x = prev;
    CHECK_MESSAGE(bitwise_equal(std::span(r.trajectory).subspan(std::size_t(i + 1) * N * kE, N * kE), x), "step " << i);
    CHECK_MESSAGE(bitwise_equal(std::span(r.x0).subspan(std::size_t(i) * N * kE, N * kE), x0), "step " << i);
  }
  CHECK(bitwise_equal(r.images, x));
  // And the noise really was used: a different noise gives a different result.
  noise[0] += 1.f;
  auto r2 = s->sample(o);
  CHECK(!bitwise_equal(r.images, r2.images));
}

TEST_CASE("sampler: seeded noise is Philox keyed by (seed, stream, step, element)") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 1);
  SampleOptions o;
  o.steps = 3;
  o.eta = 1.0;
  o.seed = 77;
  o.want_trajectory = true;
  auto seeded = s->sample(o);
  std::vector<float> xT(kE), noise(3 * kE);
  fill_normal(77, kNoiseStreamInitial, 0, xT);
  for (int i = 0; i < 3; ++i) fill_normal(77, kNoiseStreamStep, std::uint32_t(i), std::span(noise).subspan(i * kE, kE));
  CHECK(bitwise_equal(std::span(seeded.trajectory).first(kE), xT));
  o.x_T = xT;
  o.noise = noise;
  auto supplied = s->sample(o);
  CHECK(bitwise_equal(seeded.images, supplied.images));
}

TEST_CASE("sampler: options reach the step (clip, set_alpha_to_one, spacing, custom timesteps, steps_offset)") {
  ScheduleConfig sc;
  sc.prediction_type = PredictionType::VPrediction;
  auto model = test::tiny_model(2, sc);
  auto s = test::cpu_session(model, 1);
  SampleOptions o;
  o.steps = 4;
  auto base = s->sample(o);
  CHECK(base.timesteps == std::vector<int>{750, 500, 250, 0});
  o.clip_sample = false;
  CHECK(!bitwise_equal(s->sample(o).images, base.images));
  o.clip_sample.reset();
  o.set_alpha_to_one = false;
  CHECK(!bitwise_equal(s->sample(o).images, base.images));
  o.set_alpha_to_one.reset();
  o.spacing = Spacing::Trailing;
  CHECK(s->sample(o).timesteps == std::vector<int>{999, 749, 499, 249});
  o.spacing.reset();
  o.steps_offset = 1;
  CHECK(s->sample(o).timesteps == std::vector<int>{751, 501, 251, 1});
  o.steps_offset.reset();
  o.timesteps = {900, 450, 20};
  auto custom = s->sample(o);
  CHECK(custom.timesteps == std::vector<int>{900, 450, 20});
  o.timesteps = {5, 10};
  CHECK_THROWS_AS(s->sample(o), Error);
}

TEST_CASE("sampler: a spacing that gives another step count says so and uses the real count everywhere") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 1);
  SampleOptions o;
  o.steps = 30;
  o.spacing = Spacing::Uniform;
  o.want_trajectory = true;
  auto r = s->sample(o);
  CHECK(r.timesteps.size() != 30);
  CHECK(!r.warning.empty());
  CHECK(r.trajectory.size() == (r.timesteps.size() + 1) * kE);
  // The noise must then have the real count of slices.
  std::vector<float> noise(30 * kE, 0.f);
  o.eta = 1.0;
  o.noise = noise;
  CHECK_THROWS_WITH_AS(s->sample(o), doctest::Contains("steps taken"), Error);
}

TEST_CASE("sampler: bad arguments are clear errors") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 2);
  SampleOptions o;
  o.steps = 1001;
  CHECK_THROWS_WITH_AS(s->sample(o), doctest::Contains("1001"), Error);
  o.steps = 0;
  CHECK_THROWS_AS(s->sample(o), Error);
  o.steps = 5;
  o.eta = -1;
  CHECK_THROWS_WITH_AS(s->sample(o), doctest::Contains("eta"), Error);
  o.eta = 0;
  std::vector<float> wrong(kE);  // batch is 2
  o.x_T = wrong;
  CHECK_THROWS_WITH_AS(s->sample(o), doctest::Contains("x_T has"), Error);
  o.x_T = {};
  std::vector<float> noise(5 * 2 * kE);
  o.noise = noise;
  CHECK_THROWS_WITH_AS(s->sample(o), doctest::Contains("eta = 0"), Error);
  SessionOptions so;
  so.backend = BackendKind::Cpu;
  so.precision = Precision::FP16;
  CHECK_THROWS_WITH_AS(Session::create(model, so), doctest::Contains("fp16 needs the CUDA backend"), Error);
  so.precision = Precision::Auto;
  so.batch = 0;
  CHECK_THROWS_AS(Session::create(model, so), Error);
  so.batch = kMaxBatch + 1;  // 65536: one past what a CUDA grid dimension holds
  CHECK(kMaxBatch == 65535);
  CHECK_THROWS_WITH_AS(Session::create(model, so), doctest::Contains("[1, 65535]"), Error);
  std::vector<float> x(2 * kE);
  std::vector<int> t{1000};
  CHECK_THROWS_WITH_AS(s->forward(x, t), doctest::Contains("timestep 1000"), Error);
}

TEST_CASE("sampler: the progress callback sees every step and can cancel") {
  auto model = test::tiny_model();
  auto s = test::cpu_session(model, 1);
  SampleOptions o;
  o.steps = 5;
  std::vector<int> seen;
  o.progress = [&](int done, int total) {
    CHECK(total == 5);
    seen.push_back(done);
    return done < 3;
  };
  try {
    s->sample(o);
    FAIL("not cancelled");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::Cancelled);
  }
  CHECK(seen == std::vector<int>{1, 2, 3});
}

TEST_CASE("backends: auto picks the CPU where there is no CUDA device, and CUDA without a device is a clear error") {
  auto model = test::tiny_model();
  SessionOptions so;
  so.backend = BackendKind::Auto;
  auto s = Session::create(model, so);
  if (cuda_device_count() == 0) {
    CHECK(s->backend() == BackendKind::Cpu);
    so.backend = BackendKind::Cuda;
    CHECK_THROWS_WITH_AS(Session::create(model, so), doctest::Contains("not available"), Error);
  }
  CHECK(s->plan_info().arena_bytes > 0);
  CHECK(s->plan_info().arena_bytes < s->plan_info().unplanned_bytes);
  CHECK(!s->plan_info().folded_nodes.empty());
}
