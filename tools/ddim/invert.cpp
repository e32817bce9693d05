// ddim invert: deterministic DDIM inversion of an image (.png) or an x0 array (.npy) to the x_T
// from which `ddim sample --x-T` with the same steps and spacing returns it; --check does that
// sampling and reports the reconstruction error.
#include <unistd.h>

#include <chrono>
#include <cmath>
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
    {"--input", "FILE", "", "what to invert: an 8-bit gray/RGB/RGBA .png (pixels mapped to [-1, 1], alpha dropped) or a float32 (N, C, H, W) or (C, H, W) .npy", true},
    {"--out", "FILE", "", "output: x_T as a float32 (N, C, H, W) .npy", true},
    {"--steps", "N", "50", "number of DDIM steps; `ddim sample --x-T` with the same --steps/--spacing maps x_T back"},
    {"--spacing", "NAME", "", "leading|trailing|linspace|uniform|quadratic|log (default: the model's)"},
    {"--timesteps", "LIST", "", "custom timesteps in sampling order (strictly decreasing), as for ddim sample"},
    {"--model-time", "WHEN", "current", "current: the model at each point's own timestep (the DDIM ODE run backwards); next: at the destination timestep, as diffusers' DDIMInverseScheduler"},
    {"--refine", "K", "0", "fixed-point refinements per step (model time current): K more forward passes per step for a closer round trip"},
    {"--trajectory", "FILE", "", "write x after every step, x0 first: float32 (S+1, N, C, H, W) .npy"},
    {"--check", "", "", "sample back from x_T (eta 0, the same timesteps, no clipping unless --clip-sample on) and print MSE and PSNR against the input"},
    {"--clip-sample", "on|off", "off", "clip the x0 prediction when --check samples back (clipping is not inverted)"},
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

struct Input {
  std::vector<float> data;  // (N, C, H, W)
  std::int64_t n = 0, c = 0, h = 0, w = 0;
};

// A PNG (one image) or a float32 .npy of (N, C, H, W) or (C, H, W), checked against the model's
// channel count.
Input read_input(const std::string& path, std::int64_t channels) {
  const std::string what = "--input " + format::quote_path(path);
  Input in;
  if (extension_of(path) == ".png") {
    const tools::DecodedPng png = tools::read_png(path);
    in.data = tools::image_to_tensor(png.image, static_cast<int>(channels), what);
    in.n = 1;
    in.c = channels;
    in.h = png.image.height;
    in.w = png.image.width;
    return in;
  }
  // The declared shape is checked before the data is read.
  const auto as_batch = [](std::span<const std::int64_t> shape) {
    std::vector<std::int64_t> s(shape.begin(), shape.end());
    if (s.size() == 3) s.insert(s.begin(), 1);
    return s;
  };
  tools::NpyArray array = tools::read_npy_f32(path, [&](std::span<const std::int64_t> declared) {
    const std::vector<std::int64_t> shape = as_batch(declared);
    if (shape.size() == 4 && (shape[0] < 1 || shape[0] > kMaxBatch)) {
      throw Error(ErrorCode::InvalidArgument, what + ": batch " + std::to_string(shape[0]) + " is out of range [1, " +
                                                  std::to_string(kMaxBatch) + "]");
    }
    check_shape(shape, std::vector<std::int64_t>{-1, channels, -1, -1}, what,
                "(N, C, H, W) or (C, H, W) with the model's " + std::to_string(channels) + " channels");
    if (shape[2] < 1 || shape[3] < 1 || shape[2] > kMaxSampleSize || shape[3] > kMaxSampleSize) {
      throw Error(ErrorCode::InvalidArgument, what + ": invalid sample size " + tools::shape_to_string(shape));
    }
  });
  array.shape = as_batch(array.shape);
  check_finite(array.data, what);
  in.n = array.shape[0];
  in.c = array.shape[1];
  in.h = array.shape[2];
  in.w = array.shape[3];
  in.data = std::move(array.data);
  return in;
}

}  // namespace

const CommandSpec kInvertCommand{"invert", "", "DDIM inversion: the x_T that sample maps to a given image.", kOptions};

int run_invert(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const std::string input_path = args.str("--input");
  const std::string out = args.str("--out");
  InvertOptions options;
  options.steps = args.integer("--steps", 1, 1'000'000);
  read_timestep_options(args, options.steps, options.spacing, options.timesteps);
  try {
    options.model_time = parse_model_time(args.str("--model-time"));
  } catch (const ddim::Error& e) {
    throw UsageError(std::string("--model-time: ") + e.what());
  }
  options.refine = args.integer("--refine", 0, 100);
  if (options.refine > 0 && options.model_time != ModelTime::Current)
    throw UsageError("--refine applies to --model-time current only");
  const bool check = args.flag("--check");
  const bool clip_sample = args.on_off("--clip-sample").value_or(false);
  if (args.given("--clip-sample") && !check) throw UsageError("--clip-sample applies to --check's sampling only; add --check");

  SessionOptions session_options = session_options_from(args);

  const std::string input_ext = extension_of(input_path);
  if (input_ext != ".png" && input_ext != ".npy") {
    throw UsageError("--input: " + format::quote_path(input_path) + " must end in .png or .npy");
  }
  output_extension(out, "--out", {".npy"});
  const std::optional<std::string> trajectory_path = args.get("--trajectory");
  if (trajectory_path) output_extension(*trajectory_path, "--trajectory", {".npy"});
  tools::OutputFiles outputs;
  outputs.add(out, "--out");
  if (trajectory_path) outputs.add(*trajectory_path, "--trajectory");

  // ---- the model and the input
  const std::shared_ptr<const Model> model = Model::load(model_path);
  plan_timesteps(*model, args, options.steps, options.spacing, options.timesteps, std::nullopt);  // option errors first
  const Input input = read_input(input_path, model->info().in_channels);
  session_options.batch = static_cast<int>(input.n);
  // A latent model inverts latents (its session takes the decoded image's size; nothing is decoded).
  const int factor = model->info().is_latent() ? model->info().latent.factor : 1;
  session_options.height = static_cast<int>(input.h) * factor;
  session_options.width = static_cast<int>(input.w) * factor;
  session_options.decode = false;
  options.want_trajectory = trajectory_path.has_value();
  options.conditioning = conditioning_from(args);
  check_conditioning(*model, options.conditioning, session_options.batch);

  // ---- invert
  const std::unique_ptr<Session> session =
      create_session(model, session_options, "--input " + format::quote_path(input_path), false, args);
  const PlanInfo& plan_info = session->plan_info();
  if (isatty(STDERR_FILENO)) options.progress = make_progress_bar();
  const auto start = std::chrono::steady_clock::now();
  const InvertResult result = session->invert(input.data, options);
  const double seconds = seconds_since(start);
  if (!result.warning.empty()) warn(result.warning);

  const std::int64_t S = static_cast<std::int64_t>(result.timesteps.size());
  const std::int64_t n = input.n, c = input.c, h = input.h, w = input.w;
  if (result.x_T.size() != input.data.size() ||
      (trajectory_path && result.trajectory.size() != static_cast<std::size_t>(S + 1) * input.data.size())) {
    throw Error(ErrorCode::Internal, "the session returned arrays of the wrong size");
  }
  const std::int64_t shape[] = {n, c, h, w};
  outputs.stage(out, tools::encode_npy_f32(shape, result.x_T));
  if (trajectory_path) {
    const std::int64_t trajectory_shape[] = {S + 1, n, c, h, w};
    outputs.stage(*trajectory_path, tools::encode_npy_f32(trajectory_shape, result.trajectory));
  }

  // ---- --check: sample back with the same timesteps at eta 0 (before the outputs are committed:
  // a failure here leaves them as they were)
  std::string check_line;
  if (check) {
    SampleOptions back;
    back.timesteps.assign(result.timesteps.rbegin(), result.timesteps.rend());
    back.eta = 0.0;
    back.x_T = result.x_T;
    back.conditioning = options.conditioning;
    back.clip_sample = clip_sample;  // thresholding models: dynamic thresholding still applies (as in sample)
    const SampleResult sampled = session->sample(back);
    if (sampled.images.size() != input.data.size()) throw Error(ErrorCode::Internal, "--check: wrong sample size");
    double sum = 0.0, max_abs = 0.0;
    for (std::size_t i = 0; i < input.data.size(); ++i) {
      const double d = static_cast<double>(sampled.images[i]) - static_cast<double>(input.data[i]);
      sum += d * d;
      max_abs = std::max(max_abs, std::fabs(d));
    }
    const double mse = sum / static_cast<double>(input.data.size());
    // Data in [-1, 1]: the peak-to-peak range is 2, so PSNR = 10 log10(2^2 / MSE) (the PSNR of
    // the images in [0, 1] or of 8-bit pixels).
    const double psnr = mse > 0.0 ? 10.0 * std::log10(4.0 / mse) : std::numeric_limits<double>::infinity();
    const char* clipping = model->schedule().thresholding ? "dynamic thresholding" : clip_sample ? "on" : "off";
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "check: sampled back from x_T (%lld steps, eta 0, clipping %s): MSE %.6e, PSNR %.2f dB, max abs error %.4g\n",
                  static_cast<long long>(S), clipping, mse, psnr, max_abs);
    check_line = buf;
  }
  outputs.commit();
  std::fprintf(stderr, "ddim: inverted %lld x %lldx%lldx%lld, %lld steps (model time %s, refine %d, timesteps %d..%d) on %s %s in %.3f s -> %s\n",
               static_cast<long long>(n), static_cast<long long>(c), static_cast<long long>(h),
               static_cast<long long>(w), static_cast<long long>(S), to_string(options.model_time), options.refine,
               result.timesteps.front(), result.timesteps.back(), plan_info.backend.c_str(),
               plan_info.precision.c_str(), seconds, one_line(out).c_str());
  std::fputs(check_line.c_str(), stdout);
  return 0;
}

}  // namespace ddim::cli
