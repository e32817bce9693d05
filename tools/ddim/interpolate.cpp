// ddim interpolate: spherical interpolation between two x_T (from two seeds or two .npy files),
// every frame sampled with eta = 0 in one batch; the end frames are exactly the plain samples of
// the two ends (the CPU sampler is independent of the batch position).
#include <unistd.h>

#include <charconv>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <limits>
#include <optional>

#include "commands.hpp"
#include "ddim/error.hpp"
#include "files.hpp"
#include "format/input_file.hpp"
#include "ddim/model.hpp"
#include "ddim/schedule.hpp"
#include "ddim/toolkit.hpp"
#include "npy.hpp"
#include "png.hpp"

namespace ddim::cli {
namespace {

constexpr OptionSpec kOptions[] = {
    {"--model", "FILE", "", "model file", true},
    {"--seeds", "A,B", "", "the two ends: the x_T that `ddim sample --seed A` and `--seed B` start from"},
    {"--x-T", "A.npy,B.npy", "", "the two ends as float32 (1, C, H, W) or (C, H, W) .npy files"},
    {"--frames", "F", "9", "number of frames, the two ends included (at least 2)"},
    {"--steps", "N", "50", "number of DDIM steps (eta 0)"},
    {"--spacing", "NAME", "", "leading|trailing|linspace|uniform|quadratic|log (default: the model's)"},
    {"--timesteps", "LIST", "", "custom timesteps, strictly decreasing, e.g. 999,750,500,250,0"},
    {"--out", "FILE", "interpolation.png", "output: a .png strip (one row of F frames) or a .npy of the raw float32 (F, C, H, W)"},
    {"--device", "DEV", "auto", "auto|cpu|cuda|cuda:N"},
    {"--precision", "P", "auto", "auto|fp32|fp16|bf16; auto is fp16 on CUDA, fp32 on the CPU"},
    {"--threads", "N", "0", "CPU worker threads (at most 1024), 0 for all cores"},
    {"--class-labels", "LIST", "", "class-conditional models: labels, one for all or one per sample, e.g. 3,7 (index models: integers in [0, K))"},
    {"--class-embeddings", "FILE", "", "vector (identity) models: float32 (N, D) or (D) .npy of class embeddings"},
    {"--guidance-scale", "W", "1", "classifier-free guidance scale w in [0, 1000]; 1 runs the conditional model only"},
    {"--guidance-rescale", "PHI", "0", "guidance rescale in [0, 1] (diffusers' guidance_rescale); 0 is off"},
    {"--null-class-label", "X", "", "the unconditional label for guidance (default: the model file's)"},
    {"--null-class-embedding", "FILE", "", "vector models: the unconditional (D) .npy for guidance (default: the model file's)"},
};

// "A,B": exactly two items.
std::pair<std::string, std::string> split_pair(const std::string& text, std::string_view option) {
  const std::size_t comma = text.find(',');
  if (comma == std::string::npos || text.find(',', comma + 1) != std::string::npos || comma == 0 ||
      comma + 1 == text.size()) {
    throw UsageError(std::string(option) + ": '" + text + "' must be two items separated by one comma");
  }
  return {text.substr(0, comma), text.substr(comma + 1)};
}

std::uint64_t parse_seed(const std::string& text, std::string_view option) {
  std::uint64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec != std::errc() || ptr != end) {
    throw UsageError(std::string(option) + ": '" + text + "' is not a non-negative 64-bit integer");
  }
  return value;
}

tools::NpyArray read_end(const std::string& path, std::int64_t channels) {
  const std::string what = "--x-T " + format::quote_path(path);
  const auto as_one = [](std::span<const std::int64_t> shape) {
    std::vector<std::int64_t> s(shape.begin(), shape.end());
    if (s.size() == 3) s.insert(s.begin(), 1);
    return s;
  };
  // The declared shape is checked before the data is read.
  tools::NpyArray array = tools::read_npy_f32(path, [&](std::span<const std::int64_t> declared) {
    const std::vector<std::int64_t> shape = as_one(declared);
    check_shape(shape, std::vector<std::int64_t>{1, channels, -1, -1}, what,
                "one sample, (1, C, H, W) or (C, H, W), with the model's " + std::to_string(channels) + " channels");
    if (shape[2] < 1 || shape[3] < 1 || shape[2] > kMaxSampleSize || shape[3] > kMaxSampleSize) {
      throw Error(ErrorCode::InvalidArgument, what + ": invalid sample size " + tools::shape_to_string(shape));
    }
  });
  array.shape = as_one(array.shape);
  check_finite(array.data, what);
  return array;
}

}  // namespace

const CommandSpec kInterpolateCommand{"interpolate", "",
                                      "Spherical interpolation between two x_T, every frame sampled (eta 0).", kOptions};

int run_interpolate(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const std::optional<std::string> seeds_text = args.get("--seeds");
  const std::optional<std::string> files_text = args.get("--x-T");
  if (seeds_text.has_value() == files_text.has_value()) throw UsageError("give the two ends with either --seeds or --x-T");
  const int frames = args.integer("--frames", 2, 4096);
  SampleOptions options;
  options.steps = args.integer("--steps", 1, 1'000'000);
  options.eta = 0.0;
  read_timestep_options(args, options.steps, options.spacing, options.timesteps);
  std::uint64_t seed_a = 0, seed_b = 0;
  std::string path_a, path_b;
  if (seeds_text) {
    const auto [a, b] = split_pair(*seeds_text, "--seeds");
    seed_a = parse_seed(a, "--seeds");
    seed_b = parse_seed(b, "--seeds");
  } else {
    std::tie(path_a, path_b) = split_pair(*files_text, "--x-T");
  }
  SessionOptions session_options = session_options_from(args);
  const std::string out = args.str("--out");
  const bool out_png = output_extension(out, "--out", {".png", ".npy"}) == ".png";
  tools::OutputFiles outputs;
  outputs.add(out, "--out");

  // ---- the model and the two ends
  const std::shared_ptr<const Model> model = Model::load(model_path);
  const std::int64_t channels = model->info().in_channels;
  if (out_png && channels != 1 && channels != 3) {
    throw Error(ErrorCode::InvalidArgument, "the model's samples have " + std::to_string(channels) +
                                                " channels, which a PNG cannot hold; use --out FILE.npy");
  }
  plan_timesteps(*model, args, options.steps, options.spacing, options.timesteps, std::nullopt);  // option errors first
  std::int64_t height = model->info().height, width = model->info().width;
  std::vector<float> a, b;
  if (seeds_text) {
    const auto count = static_cast<std::size_t>(channels * height * width);
    a = initial_noise(seed_a, count);
    b = initial_noise(seed_b, count);
  } else {
    tools::NpyArray end_a = read_end(path_a, channels), end_b = read_end(path_b, channels);
    if (end_a.shape != end_b.shape) {
      throw Error(ErrorCode::InvalidArgument, "--x-T: the two ends have shapes " + tools::shape_to_string(end_a.shape) +
                                                  " and " + tools::shape_to_string(end_b.shape));
    }
    height = end_a.shape[2];
    width = end_a.shape[3];
    a = std::move(end_a.data);
    b = std::move(end_b.data);
  }

  // ---- the frames: slerp(a, b, k / (F - 1)); the ends are a and b themselves
  const std::size_t per = a.size();
  std::vector<float> x_T(per * static_cast<std::size_t>(frames));
  for (int k = 0; k < frames; ++k) {
    float* dst = x_T.data() + per * static_cast<std::size_t>(k);
    if (k == 0) std::copy(a.begin(), a.end(), dst);
    else if (k == frames - 1) std::copy(b.begin(), b.end(), dst);
    else {
      const std::vector<float> frame = slerp(a, b, static_cast<double>(k) / static_cast<double>(frames - 1));
      std::copy(frame.begin(), frame.end(), dst);
    }
  }
  options.x_T = x_T;

  // ---- sample all frames as one batch (one label for all frames)
  options.conditioning = conditioning_from(args);
  check_conditioning(*model, options.conditioning, frames);
  session_options.batch = frames;
  const int factor = model->info().is_latent() ? model->info().latent.factor : 1;  // latents in, images out
  session_options.height = static_cast<int>(height) * factor;
  session_options.width = static_cast<int>(width) * factor;
  const std::unique_ptr<Session> session = create_session(
      model, session_options, seeds_text ? std::string("the model's sample size") : "--x-T " + format::quote_path(path_a), false, args);
  const PlanInfo& plan_info = session->plan_info();
  if (isatty(STDERR_FILENO)) options.progress = make_progress_bar();
  const auto start = std::chrono::steady_clock::now();
  const SampleResult result = session->sample(options);
  const double seconds = seconds_since(start);
  if (!result.warning.empty()) warn(result.warning);
  if (result.images.size() != x_T.size()) throw Error(ErrorCode::Internal, "the session returned the wrong number of values");

  const std::string spacing_name = options.timesteps.empty()
                                       ? to_string(options.spacing.value_or(model->schedule().timestep_spacing))
                                       : "custom";
  if (out_png) {
    tools::TextChunks text = {
        {"Software", version_string()},
        {"steps", std::to_string(result.timesteps.size())},
        {"eta", "0"},
        {"spacing", spacing_name},
        {"timesteps", join(result.timesteps)},
        {"model", model_path.string()},
        {"interpolation", "slerp of x_T, " + std::to_string(frames) + " frames"},
    };
    if (seeds_text) text.emplace_back("seeds", std::to_string(seed_a) + "," + std::to_string(seed_b));
    else text.emplace_back("x_T", *files_text);
    outputs.stage(out, tools::encode_png(tools::batch_to_grid(result.images, result.n, result.c, result.h, result.w, 2, frames),
                                         text));
  } else {
    const std::int64_t shape[] = {result.n, result.c, result.h, result.w};
    outputs.stage(out, tools::encode_npy_f32(shape, result.images));
  }
  outputs.commit();
  std::fprintf(stderr, "ddim: %d frames %dx%dx%d, %zu steps (eta 0) on %s %s in %.3f s -> %s\n", frames, result.c, result.h,
               result.w, result.timesteps.size(), plan_info.backend.c_str(), plan_info.precision.c_str(), seconds,
               one_line(out).c_str());
  return 0;
}

}  // namespace ddim::cli
