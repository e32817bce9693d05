// ddim eta-study: DDIM at eta 0, 0.25, 0.5, 0.75 and 1 from ONE fixed x_T over several runs that
// differ only in their per-step noise seed (run r uses seed S + r): the cross-run variance per
// eta (exactly 0 at eta 0, where no noise is added) and a picture grid (rows eta, columns runs).
// The runs of one eta are sampled as one batch: sample r of the batch has x_T and noise seed
// S + r, and the CPU sampler is independent of the batch position.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "commands.hpp"
#include "ddim/error.hpp"
#include "files.hpp"
#include "ddim/model.hpp"
#include "ddim/schedule.hpp"
#include "ddim/toolkit.hpp"
#include "png.hpp"

namespace ddim::cli {
namespace {

constexpr OptionSpec kOptions[] = {
    {"--model", "FILE", "", "model file", true},
    {"--steps", "N", "50", "number of DDIM steps"},
    {"--seed", "S", "0", "x_T from seed S (one sample); run r uses per-step noise seed S + r"},
    {"--runs", "R", "5", "number of runs per eta (at least 2)"},
    {"--out", "FILE", "eta-study.png", "PNG grid: one row per eta, one column per run"},
    {"--device", "DEV", "auto", "auto|cpu|cuda|cuda:N"},
    {"--precision", "P", "auto", "auto|fp32|fp16|bf16; auto is fp16 on CUDA, fp32 on the CPU"},
    {"--threads", "N", "0", "CPU worker threads (at most 1024), 0 for all cores"},
};

constexpr double kEtas[] = {0.0, 0.25, 0.5, 0.75, 1.0};

// Mean over pixels of the unbiased variance across the R runs of one pixel (double).
double cross_run_variance(const std::vector<float>& images, std::size_t runs, std::size_t per) {
  double total = 0;
  for (std::size_t i = 0; i < per; ++i) {
    double mean = 0;
    for (std::size_t r = 0; r < runs; ++r) mean += images[r * per + i];
    mean /= static_cast<double>(runs);
    double ss = 0;
    for (std::size_t r = 0; r < runs; ++r) {
      const double d = images[r * per + i] - mean;
      ss += d * d;
    }
    total += ss / static_cast<double>(runs - 1);
  }
  return total / static_cast<double>(per);
}

}  // namespace

const CommandSpec kEtaStudyCommand{"eta-study", "",
                                   "DDIM eta 0 to 1 from one x_T over several noise seeds: cross-run variance per eta.",
                                   kOptions};

int run_eta_study(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const int steps = args.integer("--steps", 1, 1'000'000);
  const std::uint64_t seed = args.u64("--seed");
  const int runs = args.integer("--runs", 2, 4096);
  check_seed_range(seed, static_cast<std::uint64_t>(runs), "--seed");  // run r: noise seed seed + r
  const std::string out = args.str("--out");
  output_extension(out, "--out", {".png"});
  tools::OutputFiles outputs;
  outputs.add(out, "--out");
  SessionOptions session_options = session_options_from(args);
  session_options.batch = runs;

  // ---- the model and the one x_T, repeated for every run
  const std::shared_ptr<const Model> model = Model::load(model_path);
  const int channels = model->info().in_channels, height = model->info().height, width = model->info().width;
  if (channels != 1 && channels != 3) {
    throw Error(ErrorCode::InvalidArgument, "the model's samples have " + std::to_string(channels) +
                                                " channels, which a PNG cannot hold");
  }
  const std::size_t per = static_cast<std::size_t>(channels) * height * width;
  const std::vector<float> one = initial_noise(seed, per);
  std::vector<float> x_T;
  for (int r = 0; r < runs; ++r) x_T.insert(x_T.end(), one.begin(), one.end());

  plan_timesteps(*model, args, steps, std::nullopt, {}, std::nullopt);  // option errors first
  const std::unique_ptr<Session> session = create_session(model, session_options, "the model's sample size", false, args);
  const PlanInfo& plan_info = session->plan_info();

  // The table is printed at the end, once everything (the picture included) has succeeded.
  std::string table;
  char line[128];
  std::snprintf(line, sizeof line, "%-6s %22s %12s\n", "eta", "cross-run variance", "seconds");
  table += line;
  std::vector<float> grid;
  for (double eta : kEtas) {
    SampleOptions o;
    o.steps = steps;
    o.eta = eta;
    o.seed = seed;  // run r: noise seed seed + r
    o.x_T = x_T;
    if (isatty(STDERR_FILENO)) o.progress = make_progress_bar();
    const auto start = std::chrono::steady_clock::now();
    const SampleResult r = session->sample(o);
    const double seconds = seconds_since(start);
    if (r.images.size() != per * static_cast<std::size_t>(runs))
      throw Error(ErrorCode::Internal, "the session returned the wrong number of values");
    const double variance = cross_run_variance(r.images, static_cast<std::size_t>(runs), per);
    std::snprintf(line, sizeof line, "%-6.2f %22.9g %12.3f\n", eta, variance, seconds);
    table += line;
    grid.insert(grid.end(), r.images.begin(), r.images.end());
  }
  const tools::TextChunks text = {
      {"Software", version_string()},
      {"model", model_path.string()},
      {"seed", std::to_string(seed)},
      {"steps", std::to_string(steps)},
      {"rows", "eta 0; 0.25; 0.5; 0.75; 1"},
  };
  outputs.stage(out, tools::encode_png(tools::batch_to_grid(grid, 5 * runs, channels, height, width, 2, runs), text));
  outputs.commit();
  std::fprintf(stderr, "ddim: eta study on %s %s, %d steps, %d runs\n", plan_info.backend.c_str(),
               plan_info.precision.c_str(), steps, runs);
  std::fputs(table.c_str(), stdout);
  std::printf("\nwrote %s (5 rows x %d columns)\n", one_line(out).c_str(), runs);
  return 0;
}

}  // namespace ddim::cli
