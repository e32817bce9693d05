// ddim compare: DDPM ancestral sampling (all T steps, fixed_small and fixed_large variance) against
// DDIM (eta 0) at several step counts, all from the same x_T: time per image, MSE of each against
// the DDIM run with the most steps, a reproducibility check (two noise seeds from the same x_T:
// DDIM eta 0 bitwise identical, DDPM different) and a side-by-side PNG (one row per sampler).
#include <unistd.h>

#include <algorithm>
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
    {"--seed", "S", "0", "base seed: x_T of sample i from seed S + i; the per-step noise from S (and S + 1 for the check)"},
    {"--batch", "N", "4", "number of samples (the picture's columns)"},
    {"--steps-list", "LIST", "10,20,50,100,1000", "DDIM step counts (eta 0); the largest is the reference (entries above T are capped at T)"},
    {"--ddpm", "on|off", "on", "run the two DDPM samplers (all T steps each) and their reproducibility check"},
    {"--clip-sample", "on|off", "", "clip the x0 prediction in every sampler (default: the model's; clipping makes DDIM's "
                                    "result depend on the step count, so use off to see DDIM converge)"},
    {"--out", "FILE", "compare.png", "side-by-side PNG: one row per sampler, one column per sample"},
    {"--device", "DEV", "auto", "auto|cpu|cuda|cuda:N"},
    {"--precision", "P", "auto", "auto|fp32|fp16|bf16; auto is fp16 on CUDA, fp32 on the CPU"},
    {"--threads", "N", "0", "CPU worker threads (at most 1024), 0 for all cores"},
};

double mse(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    s += d * d;
  }
  return a.empty() ? 0.0 : s / static_cast<double>(a.size());
}

struct Row {
  std::string sampler;
  int steps = 0;
  double seconds_per_image = 0;
  std::vector<float> images;
};

}  // namespace

const CommandSpec kCompareCommand{"compare", "",
                                  "DDPM (all T steps) against DDIM at several step counts from the same x_T.", kOptions};

int run_compare(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const std::uint64_t seed = args.u64("--seed");
  const int batch = args.integer("--batch", 1, 4096);
  std::vector<int> steps_list = parse_int_list(args.str("--steps-list"), "--steps-list", 1, 1'000'000);
  if (steps_list.empty()) throw UsageError("--steps-list: give at least one step count");
  const bool with_ddpm = args.on_off("--ddpm").value_or(true);
  // x_T of sample i from seed + i, per-step noise from seed and seed + 1 (+ i).
  check_seed_range(seed, static_cast<std::uint64_t>(batch) + 1, "--seed");
  const std::string out = args.str("--out");
  output_extension(out, "--out", {".png"});
  tools::OutputFiles outputs;
  outputs.add(out, "--out");
  SessionOptions session_options = session_options_from(args);
  session_options.batch = batch;

  // ---- the model, the step counts and the shared x_T
  const std::shared_ptr<const Model> model = Model::load(model_path);
  const int channels = model->info().in_channels, height = model->info().height, width = model->info().width;
  if (channels != 1 && channels != 3) {
    throw Error(ErrorCode::InvalidArgument, "the model's samples have " + std::to_string(channels) +
                                                " channels, which a PNG cannot hold");
  }
  const int T = model->schedule().num_train_timesteps;
  for (int& s : steps_list) s = std::min(s, T);
  std::sort(steps_list.begin(), steps_list.end());
  steps_list.erase(std::unique(steps_list.begin(), steps_list.end()), steps_list.end());
  const int reference_steps = steps_list.back();

  const std::size_t per = static_cast<std::size_t>(channels) * height * width;
  std::vector<float> x_T;
  for (int i = 0; i < batch; ++i) {
    const std::vector<float> one = initial_noise(seed + static_cast<std::uint64_t>(i), per);
    x_T.insert(x_T.end(), one.begin(), one.end());
  }

  const std::unique_ptr<Session> session = create_session(model, session_options, "the model's sample size", false, args);
  const PlanInfo& plan_info = session->plan_info();
  const bool tty = isatty(STDERR_FILENO) != 0;
  const auto timed = [&](auto&& run) {
    const auto start = std::chrono::steady_clock::now();
    SampleResult r = run();
    return std::pair{std::move(r), seconds_since(start) / batch};
  };
  const std::optional<bool> clip_sample = args.on_off("--clip-sample");
  const auto run_ddpm = [&](VarianceType variance, std::uint64_t noise_seed) {
    DdpmOptions o;
    o.clip_sample = clip_sample;
    o.seed = noise_seed;
    o.x_T = x_T;
    o.variance = variance;
    if (tty) o.progress = make_progress_bar();
    return timed([&] { return session->sample_ddpm(o); });
  };
  const auto run_ddim = [&](int steps, std::uint64_t noise_seed) {
    SampleOptions o;
    o.steps = steps;
    o.eta = 0.0;
    o.clip_sample = clip_sample;
    o.seed = noise_seed;
    o.x_T = x_T;
    if (tty) o.progress = make_progress_bar();
    return timed([&] { return session->sample(o); });
  };

  std::vector<Row> rows;
  if (with_ddpm) {
    for (VarianceType v : {VarianceType::FixedSmall, VarianceType::FixedLarge}) {
      auto [r, spi] = run_ddpm(v, seed);
      rows.push_back({std::string("DDPM ") + to_string(v), T, spi, std::move(r.images)});
    }
  }
  for (int steps : steps_list) {
    auto [r, spi] = run_ddim(steps, seed);
    if (!r.warning.empty()) warn("DDIM " + std::to_string(steps) + " steps: " + r.warning);
    rows.push_back({"DDIM eta 0", static_cast<int>(r.timesteps.size()), spi, std::move(r.images)});
  }
  const std::vector<float>& reference = rows.back().images;

  // The report is printed at the end, once everything (the picture included) has succeeded.
  std::string report;
  const auto print = [&report](const char* format, auto... values) {
    char buf[512];
    std::snprintf(buf, sizeof buf, format, values...);
    report += buf;
  };
  print("%-18s %6s %14s %16s\n", "sampler", "steps", "s/image", ("MSE vs DDIM-" + std::to_string(reference_steps)).c_str());
  for (const Row& row : rows) {
    print("%-18s %6d %14.6f %16.6g\n", row.sampler.c_str(), row.steps, row.seconds_per_image, mse(row.images, reference));
  }

  // ---- reproducibility: the same x_T, per-step noise seeds S and S + 1
  print("\nreproducibility (same x_T, noise seeds %llu and %llu):\n", static_cast<unsigned long long>(seed),
        static_cast<unsigned long long>(seed + 1));
  const int check_steps = steps_list.front();
  const std::size_t first_ddim = with_ddpm ? 2 : 0;
  const std::vector<float> ddim_other = run_ddim(check_steps, seed + 1).first.images;
  const std::vector<float>& ddim_same = rows[first_ddim].images;
  const bool identical = ddim_other.size() == ddim_same.size() &&
                         std::memcmp(ddim_other.data(), ddim_same.data(), ddim_same.size() * sizeof(float)) == 0;
  print("  DDIM eta 0, %d steps: %s\n", check_steps, identical ? "bitwise identical" : "DIFFERENT (unexpected)");
  if (with_ddpm) {
    const std::vector<float> ddpm_other = run_ddpm(VarianceType::FixedSmall, seed + 1).first.images;
    const double d = mse(ddpm_other, rows[0].images);
    print("  DDPM fixed_small, %d steps: %s, MSE between the two runs %.6g\n", T, d > 0 ? "different" : "IDENTICAL (unexpected)",
          d);
  } else {
    print("  DDPM: skipped (--ddpm off)\n");
  }

  // ---- the picture: one row per sampler, one column per sample
  std::vector<float> grid;
  std::string order;
  for (const Row& row : rows) {
    grid.insert(grid.end(), row.images.begin(), row.images.end());
    order += (order.empty() ? "" : "; ") + row.sampler + " " + std::to_string(row.steps);
  }
  const tools::TextChunks text = {
      {"Software", version_string()},
      {"model", model_path.string()},
      {"seed", std::to_string(seed)},
      {"rows", order},
  };
  outputs.stage(out, tools::encode_png(tools::batch_to_grid(grid, static_cast<int>(rows.size()) * batch, channels, height,
                                                            width, 2, batch),
                                       text));
  outputs.commit();
  std::fprintf(stderr, "ddim: compare on %s %s, batch %d, T = %d\n", plan_info.backend.c_str(), plan_info.precision.c_str(),
               batch, T);
  std::fputs(report.c_str(), stdout);
  std::printf("\nwrote %s (%zu rows x %d columns)\n", one_line(out).c_str(), rows.size(), batch);
  return identical ? 0 : 1;
}

}  // namespace ddim::cli
