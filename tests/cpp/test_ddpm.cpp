// DDPM ancestral sampling (Session::sample_ddpm, kernels/ddpm_step.h, `ddim sample --sampler
// ddpm`) and the comparison tools (`ddim compare`, `ddim eta-study`).
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <sstream>

#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "npy.hpp"
#include "png.hpp"
#include "schedule/ddim_params.hpp"
#include "test_util.hpp"

using namespace ddim;
namespace fs = std::filesystem;

namespace {

constexpr std::size_t kE = 3 * 16 * 12;  // elements per sample of the tiny model

using test::bitwise_equal;

double max_rel(std::span<const float> a, std::span<const float> b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]) / (1.0 + std::fabs(double(b[i]))));
  return m;
}

ScheduleConfig short_schedule(int T = 20) {
  ScheduleConfig sc;
  sc.num_train_timesteps = T;
  sc.beta_start = 0.001;
  sc.beta_end = 0.2;
  return sc;
}

// diffusers' DDPMScheduler.step (prev_t = t - 1) in double, written from its formulas.
struct RefStep {
  const std::vector<double>& ac;
  PredictionType prediction;
  bool clip;
  double clip_range = 1.0;
  bool large;  // fixed_large, else fixed_small
  double operator()(double x, double out, double z, int t) const {
    const double a_t = ac[std::size_t(t)], a_prev = t > 0 ? ac[std::size_t(t - 1)] : 1.0;
    const double beta_prod_t = 1 - a_t, beta_prod_prev = 1 - a_prev;
    const double cur_alpha = a_t / a_prev, cur_beta = 1 - cur_alpha;
    double x0 = prediction == PredictionType::Epsilon       ? (x - std::sqrt(beta_prod_t) * out) / std::sqrt(a_t)
                : prediction == PredictionType::VPrediction ? std::sqrt(a_t) * x - std::sqrt(beta_prod_t) * out
                                                             : out;
    if (clip) x0 = std::clamp(x0, -clip_range, clip_range);
    const double c0 = std::sqrt(a_prev) * cur_beta / beta_prod_t;
    const double ct = std::sqrt(cur_alpha) * beta_prod_prev / beta_prod_t;
    double prev = c0 * x0 + ct * x;
    if (t > 0) {
      double var = std::max(beta_prod_prev / beta_prod_t * cur_beta, 1e-20);
      if (large) var = cur_beta;
      prev += std::sqrt(var) * z;
    }
    return prev;
  }
};

// ---- the CLI
using ddim::test::CliRun;
using ddim::test::run_cli;
using ddim::test::TempDir;


std::string write_tiny_model(const TempDir& dir, ScheduleConfig schedule) {
  const std::string path = dir / "tiny.ddim";
  format::write_file(path, graph::make_random_model_file(test::tiny_unet(), schedule, 4));
  return path;
}

}  // namespace

TEST_CASE("ddpm: the step matches diffusers' formulas for epsilon and v with both variances and clip on and off") {
  const std::size_t n = 512;
  std::vector<float> x = initial_noise(1, n), out = initial_noise(2, n), z = initial_noise(3, n);
  for (float& v : x) v *= 1.5f;
  for (PredictionType pred : {PredictionType::Epsilon, PredictionType::VPrediction}) {
    for (bool large : {false, true}) {
      for (bool clip : {false, true}) {
        ScheduleConfig sc;
        sc.prediction_type = pred;
        const Scheduler scheduler(sc);
        const RefStep ref{scheduler.alphas_cumprod(), pred, clip, 1.0, large};
        for (int t : {0, 1, 3, 500, 999}) {
          CAPTURE(int(pred));
          CAPTURE(large);
          CAPTURE(clip);
          CAPTURE(t);
          const DdimStepParams p = make_ddpm_step_params(t, scheduler.alphas_cumprod(), sc,
                                                         large ? VarianceType::FixedLarge : VarianceType::FixedSmall, clip);
          CHECK(p.update == kUpdateDdpm);
          CHECK((p.sigma > 0.f) == (t > 0));
          std::vector<float> x0(n), prev(n);
          ddim_step_sample(p, x, out, z, x0, prev, sc.dynamic_thresholding_ratio, sc.sample_max_value);
          std::vector<float> want(n);
          for (std::size_t i = 0; i < n; ++i) want[i] = float(ref(x[i], out[i], z[i], t));
          CHECK(max_rel(prev, want) < 2e-5);
          if (clip) CHECK(std::all_of(x0.begin(), x0.end(), [](float v) { return std::fabs(v) <= 1.f; }));
        }
      }
    }
  }
  // The sample parameterisation and a custom clip range go through the same code.
  ScheduleConfig sc;
  sc.prediction_type = PredictionType::Sample;
  sc.clip_sample_range = 0.5;
  const Scheduler scheduler(sc);
  const RefStep ref{scheduler.alphas_cumprod(), PredictionType::Sample, true, 0.5, false};
  const DdimStepParams p = make_ddpm_step_params(100, scheduler.alphas_cumprod(), sc, VarianceType::FixedSmall, std::nullopt);
  std::vector<float> x0(n), prev(n), want(n);
  ddim_step_sample(p, x, out, z, x0, prev, 0.995, 1.0);
  for (std::size_t i = 0; i < n; ++i) want[i] = float(ref(x[i], out[i], z[i], 100));
  CHECK(max_rel(prev, want) < 2e-5);
}

TEST_CASE("ddpm: variance types other than fixed_small and fixed_large are refused") {
  const ScheduleConfig sc;
  const Scheduler scheduler(sc);
  for (VarianceType v : {VarianceType::Learned, VarianceType::LearnedRange, VarianceType::FixedLargeLog}) {
    try {
      make_ddpm_step_params(10, scheduler.alphas_cumprod(), sc, v, std::nullopt);
      FAIL("no error");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Unsupported);
      CHECK(test::contains(e.what(), to_string(v)));
    }
  }
  // fixed_small_log has fixed_small's standard deviation.
  const auto a = make_ddpm_step_params(10, scheduler.alphas_cumprod(), sc, VarianceType::FixedSmall, std::nullopt);
  const auto b = make_ddpm_step_params(10, scheduler.alphas_cumprod(), sc, VarianceType::FixedSmallLog, std::nullopt);
  CHECK(a.sigma == b.sigma);
}

TEST_CASE("ddpm: sample_ddpm with supplied noise equals a manual loop of Session::forward and the step") {
  const ScheduleConfig sc = short_schedule(20);
  auto model = test::tiny_model(3, sc);
  auto s = test::cpu_session(model, 2);
  const int T = 20;
  const Scheduler scheduler(model->schedule());
  std::vector<float> x_T = initial_noise(7, 2 * kE);
  std::vector<float> noise = initial_noise(8, std::size_t(T) * 2 * kE);
  for (bool large : {false, true}) {
    CAPTURE(large);
    DdpmOptions o;
    o.x_T = x_T;
    o.noise = noise;
    o.variance = large ? VarianceType::FixedLarge : VarianceType::FixedSmall;
    o.want_trajectory = true;
    const SampleResult r = s->sample_ddpm(o);
    REQUIRE(r.timesteps.size() == std::size_t(T));
    CHECK(r.timesteps.front() == T - 1);
    CHECK(r.timesteps.back() == 0);
    REQUIRE(r.trajectory.size() == std::size_t(T + 1) * 2 * kE);

    const RefStep ref{scheduler.alphas_cumprod(), model->schedule().prediction_type, model->schedule().clip_sample, 1.0,
                      large};
    std::vector<float> x = x_T;
    for (int k = 0; k < T; ++k) {
      const int t = T - 1 - k;
      const std::vector<int> ts{t};
      const std::vector<float> eps = s->forward(x, ts);
      for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(ref(x[i], eps[i], noise[std::size_t(k) * 2 * kE + i], t));
      CAPTURE(k);
      // Each step from the engine's own previous point: one step's rounding only.
      std::vector<float> from(r.trajectory.begin() + std::ptrdiff_t(std::size_t(k) * 2 * kE),
                              r.trajectory.begin() + std::ptrdiff_t(std::size_t(k + 1) * 2 * kE));
      const std::vector<float> eps2 = s->forward(from, ts);
      std::vector<float> one(from.size());
      for (std::size_t i = 0; i < from.size(); ++i)
        one[i] = float(ref(from[i], eps2[i], noise[std::size_t(k) * 2 * kE + i], t));
      CHECK(max_rel(std::span(r.trajectory).subspan(std::size_t(k + 1) * 2 * kE, 2 * kE), one) < 1e-5);
    }
    CHECK(max_rel(r.images, x) < 1e-3);
  }
}

TEST_CASE("ddpm: seeded sampling equals itself and differs across noise seeds from the same x_T") {
  auto model = test::tiny_model(2, short_schedule(12));
  auto s = test::cpu_session(model, 2);
  DdpmOptions o;
  o.seed = 5;
  o.want_trajectory = true;
  const SampleResult a = s->sample_ddpm(o);
  const SampleResult b = s->sample_ddpm(o);
  CHECK(bitwise_equal(a.images, b.images));
  // x_T from the seeds, as Session::sample draws it.
  std::vector<float> x_T = initial_noise(5, kE);
  const std::vector<float> second = initial_noise(6, kE);
  x_T.insert(x_T.end(), second.begin(), second.end());
  CHECK(bitwise_equal(std::span(a.trajectory).first(2 * kE), x_T));
  // The same x_T with another noise seed: a different sample.
  o.want_trajectory = false;
  o.x_T = x_T;
  const SampleResult same = s->sample_ddpm(o);
  CHECK(bitwise_equal(same.images, a.images));
  o.seed = 6;
  const SampleResult other = s->sample_ddpm(o);
  CHECK_FALSE(bitwise_equal(other.images, a.images));
  // Every value finite.
  CHECK(std::all_of(other.images.begin(), other.images.end(), [](float v) { return std::isfinite(v); }));
}

TEST_CASE("ddpm: sample_ddpm errors name the problem") {
  auto model = test::tiny_model(2, short_schedule(12));
  auto s = test::cpu_session(model, 1);
  DdpmOptions o;
  std::vector<float> bad(5);
  o.noise = bad;
  CHECK(test::contains(test::error_of([&] { s->sample_ddpm(o); }), "(T, N, C, H, W) with T = 12"));
  o.noise = {};
  o.x_T = bad;
  CHECK(test::contains(test::error_of([&] { s->sample_ddpm(o); }), "x_T has 5 values"));
  o.x_T = {};
  o.variance = VarianceType::Learned;
  try {
    s->sample_ddpm(o);
    FAIL("no error");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::Unsupported);
    CHECK(test::contains(e.what(), "learned"));
  }
}

TEST_CASE("ddpm: ddim sample --sampler ddpm equals the library and checks its options") {
  TempDir dir;
  const std::string model_path = write_tiny_model(dir, short_schedule(12));
  const auto model = Model::load(model_path);
  auto s = test::cpu_session(model, 2);
  const std::vector<float> x_T = initial_noise(3, 2 * kE), noise = initial_noise(4, 12 * 2 * kE);
  const std::int64_t xs[] = {2, 3, 16, 12}, zs[] = {12, 2, 3, 16, 12};
  tools::write_npy_f32(dir / "xT.npy", xs, x_T);
  tools::write_npy_f32(dir / "z.npy", zs, noise);
  DdpmOptions o;
  o.x_T = x_T;
  o.noise = noise;
  o.variance = VarianceType::FixedLarge;
  const SampleResult want = s->sample_ddpm(o);
  CliRun r = run_cli("sample --sampler ddpm --variance fixed_large --model " + model_path + " --x-T " + dir / "xT.npy" +
                  " --noise " + dir / "z.npy" + " --device cpu --out " + dir / "out.npy");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(test::contains(r.output, "12 steps (DDPM, fixed_large)"));
  CHECK(bitwise_equal(tools::read_npy_f32(dir / "out.npy").data, want.images));
  r = run_cli("sample --sampler ddpm --eta 1 --model " + model_path + " --device cpu --out " + dir / "x.npy");
  CHECK(r.code == 2);
  CHECK(test::contains(r.output, "--eta applies to --sampler ddim only"));
  r = run_cli("sample --variance fixed_large --model " + model_path + " --device cpu --out " + dir / "x.npy");
  CHECK(r.code == 2);
  r = run_cli("sample --sampler ddpm --variance learned --model " + model_path + " --device cpu --out " + dir / "x.npy");
  CHECK(r.code == 2);
  r = run_cli("sample --sampler euler --model " + model_path + " --device cpu --out " + dir / "x.npy");
  CHECK(r.code == 2);
}

TEST_CASE("ddpm: ddim compare prints the table and the reproducibility check and writes the PNG") {
  TempDir dir;
  const std::string model_path = write_tiny_model(dir, short_schedule(12));
  const CliRun r = run_cli("compare --model " + model_path + " --steps-list 2,4 --batch 2 --seed 3 --device cpu --out " +
                        dir / "cmp.png");
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(test::contains(r.output, "MSE vs DDIM-4"));
  CHECK(test::contains(r.output, "DDPM fixed_small"));
  CHECK(test::contains(r.output, "DDPM fixed_large"));
  CHECK(test::contains(r.output, "DDIM eta 0, 2 steps: bitwise identical"));
  CHECK(test::contains(r.output, "DDPM fixed_small, 12 steps: different"));
  // The reference row's own MSE is 0.
  std::istringstream lines(r.output);
  std::string line;
  int rows = 0;
  while (std::getline(lines, line)) {
    if (line.rfind("DDIM eta 0 ", 0) == 0 && line.find(" 4 ") != std::string::npos) {
      ++rows;
      CHECK(line.substr(line.size() - 2) == " 0");
    }
  }
  CHECK(rows == 1);
  const tools::DecodedPng png = tools::read_png(dir / "cmp.png");
  CHECK(png.image.width == 2 * 12 + 3 * 2);
  CHECK(png.image.height == 4 * 16 + 5 * 2);
  // --ddpm off: DDIM rows only.
  const CliRun quick = run_cli("compare --model " + model_path + " --steps-list 2,4 --batch 1 --ddpm off --device cpu --out " +
                            dir / "q.png");
  INFO(quick.output);
  REQUIRE(quick.code == 0);
  CHECK_FALSE(test::contains(quick.output, "DDPM fixed_small "));
  CHECK(test::contains(quick.output, "DDPM: skipped"));
  CHECK(tools::read_png(dir / "q.png").image.height == 2 * 16 + 3 * 2);
}

TEST_CASE("ddpm: ddim eta-study gives exactly zero variance at eta 0 and more with more eta") {
  TempDir dir;
  const std::string model_path = write_tiny_model(dir, short_schedule(50));
  const CliRun r = run_cli("eta-study --model " + model_path + " --steps 5 --runs 3 --device cpu --out " + dir / "eta.png");
  INFO(r.output);
  REQUIRE(r.code == 0);
  std::istringstream lines(r.output);
  std::string line;
  std::vector<std::pair<double, double>> rows;  // (eta, variance)
  while (std::getline(lines, line)) {
    double eta = 0, var = 0, sec = 0;
    if (std::sscanf(line.c_str(), "%lf %lf %lf", &eta, &var, &sec) == 3) rows.emplace_back(eta, var);
  }
  REQUIRE(rows.size() == 5);
  CHECK(rows[0].first == 0.0);
  CHECK(rows[0].second == 0.0);
  for (std::size_t i = 1; i < rows.size(); ++i) {
    CAPTURE(i);
    CHECK(rows[i].second > rows[i - 1].second);
  }
  const tools::DecodedPng png = tools::read_png(dir / "eta.png");
  CHECK(png.image.width == 3 * 12 + 4 * 2);
  CHECK(png.image.height == 5 * 16 + 6 * 2);
}
