// ddim sample: DDIM sampling of a batch to PNG / .npy (or, with --sampler ddpm, DDPM ancestral
// sampling over all T training timesteps).
#include <unistd.h>

#include <algorithm>
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
    {"--sampler", "NAME", "ddim", "ddim|ddpm; ddpm runs all T training timesteps (--steps is ignored)"},
    {"--variance", "NAME", "", "ddpm only: fixed_small|fixed_large (default: the model's variance_type)"},
    {"--steps", "N", "50", "number of DDIM steps"},
    {"--eta", "X", "0", "DDIM eta in [0, 1]: 0 is deterministic, 1 adds DDPM-like noise"},
    {"--seed", "N", "0", "base seed; sample i uses seed + i"},
    {"--seeds", "LIST", "", "one seed per sample instead, e.g. 9,2,5 (the batch is their count); a sample depends on its own seed only"},
    {"--batch", "N", "16", "number of samples (at most 65535); with --x-T, its N"},
    {"--spacing", "NAME", "", "leading|trailing|linspace|uniform|quadratic|log (default: the model's)"},
    {"--timesteps", "LIST", "", "custom timesteps, strictly decreasing, e.g. 999,750,500,250,0"},
    {"--device", "DEV", "auto", "auto|cpu|cuda|cuda:N"},
    {"--autotune", "", "", "CUDA: time cuDNN's engines for every convolution at plan time and keep the fastest"},
    {"--profile", "", "", "CUDA: run each step eagerly with one NVTX range per graph node (for Nsight; slower)"},
    {"--precision", "P", "auto", "auto|fp32|fp16|bf16; auto is fp16 on CUDA, fp32 on the CPU"},
    {"--height", "H", "", "sample height (default: the model's); latent models: pixels of the decoded image, latents H/f"},
    {"--width", "W", "", "sample width (default: the model's); latent models: pixels of the decoded image, latents W/f"},
    {"--decode", "on|off", "on", "latent models: decode the final latents into images; off writes the latents"},
    {"--threads", "N", "0", "CPU worker threads (at most 1024), 0 for all cores"},
    {"--x-T", "FILE", "", "start from this float32 (N, C, H, W) .npy instead of seeded noise (latent models: latents)"},
    {"--noise", "FILE", "", "float32 (S, N, C, H, W) .npy: the unit-normal noise of each step (needs eta > 0; ddpm: S = T)"},
    {"--out", "FILE", "samples.png", "output: a .png grid or a .npy of the raw float32 (N, C, H, W); skipped when only --out-dir is given"},
    {"--out-dir", "DIR", "", "also write one PNG per sample, <seed>_<index>.png, with metadata"},
    {"--trajectory", "FILE", "", "write x_t after every step, x_T first: float32 (S+1, N, C, H, W) .npy"},
    {"--x0", "FILE", "", "write every step's x0 prediction: float32 (S, N, C, H, W) .npy"},
    {"--clip-sample", "on|off", "", "clip the x0 prediction (default: the model's)"},
    {"--set-alpha-to-one", "on|off", "", "final alpha-bar is 1 (default: the model's)"},
    {"--steps-offset", "K", "", "offset added to leading timesteps (default: the model's)"},
    {"--use-clipped-model-output", "", "", "recompute eps from the clipped x0 prediction"},
    {"--class-labels", "LIST", "", "class-conditional models: labels, one for all or one per sample, e.g. 3,7 (index models: integers in [0, K))"},
    {"--class-embeddings", "FILE", "", "vector (identity) models: float32 (N, D) or (D) .npy of class embeddings"},
    {"--guidance-scale", "W", "1", "classifier-free guidance scale w in [0, 1000]; 1 runs the conditional model only"},
    {"--guidance-rescale", "PHI", "0", "guidance rescale in [0, 1] (diffusers' guidance_rescale); 0 is off"},
    {"--null-class-label", "X", "", "the unconditional label for guidance (default: the model file's)"},
    {"--null-class-embedding", "FILE", "", "vector models: the unconditional (D) .npy for guidance (default: the model file's)"},
};

std::string format_real(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

const CommandSpec kSampleCommand{"sample", "", "Generate samples with DDIM from seeds or a given x_T.", kOptions};

int run_sample(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const int steps = args.integer("--steps", 1, 1'000'000);
  // Beyond 1 the noise exceeds what the step can take (sigma^2 > 1 - alpha-bar_prev): the
  // direction term is clipped to 0 and the samples blow up.
  const double eta = args.real("--eta", 0.0, 1.0);
  const std::uint64_t seed = args.u64("--seed");
  int batch_option = args.integer("--batch", 1, kMaxBatch);
  std::vector<std::uint64_t> seeds;
  if (const auto list = args.get("--seeds")) {
    if (args.given("--seed")) throw UsageError("give --seed (sample i uses seed + i) or --seeds (one per sample), not both");
    seeds = parse_u64_list(*list, "--seeds");
    if (seeds.size() > static_cast<std::size_t>(kMaxBatch))
      throw UsageError("--seeds: " + std::to_string(seeds.size()) + " seeds; at most " + std::to_string(kMaxBatch));
    if (args.given("--batch") && static_cast<std::size_t>(batch_option) != seeds.size())
      throw UsageError("--batch " + std::to_string(batch_option) + " disagrees with --seeds, which lists " +
                       std::to_string(seeds.size()) + " seeds");
    batch_option = static_cast<int>(seeds.size());
  }

  SampleOptions options;
  options.steps = steps;
  options.eta = eta;
  options.seed = seed;
  options.seeds = seeds;
  read_timestep_options(args, steps, options.spacing, options.timesteps);
  options.clip_sample = args.on_off("--clip-sample");
  options.set_alpha_to_one = args.on_off("--set-alpha-to-one");
  if (args.get("--steps-offset")) options.steps_offset = args.integer("--steps-offset", 0, 1'000'000);
  options.use_clipped_model_output = args.flag("--use-clipped-model-output");

  options.conditioning = conditioning_from(args);
  SessionOptions session_options = session_options_from(args);
  session_options.profile = args.flag("--profile");
  session_options.autotune = args.flag("--autotune");
  if (args.get("--height")) session_options.height = args.integer("--height", 1, kMaxSampleSize);
  if (args.get("--width")) session_options.width = args.integer("--width", 1, kMaxSampleSize);
  if (const auto decode = args.get("--decode")) {
    if (*decode != "on" && *decode != "off") throw UsageError("--decode: '" + *decode + "' (expected on or off)");
    session_options.decode = *decode == "on";
  }

  const std::optional<std::string> x_T_path = args.get("--x-T");
  const std::optional<std::string> noise_path = args.get("--noise");
  const std::string sampler = args.str("--sampler");
  if (sampler != "ddim" && sampler != "ddpm") throw UsageError("--sampler: '" + sampler + "' (expected ddim or ddpm)");
  const bool ddpm = sampler == "ddpm";
  DdpmOptions ddpm_options;
  if (ddpm) {
    for (const char* option : {"--eta", "--spacing", "--timesteps", "--set-alpha-to-one", "--steps-offset",
                               "--use-clipped-model-output", "--class-labels", "--class-embeddings", "--guidance-scale",
                               "--guidance-rescale", "--null-class-label", "--null-class-embedding"}) {
      if (args.given(option)) throw UsageError(std::string(option) + " applies to --sampler ddim only");
    }
    if (const auto variance = args.get("--variance")) {
      try {
        ddpm_options.variance = parse_variance_type(*variance);
      } catch (const ddim::Error& e) {
        throw UsageError(std::string("--variance: ") + e.what());
      }
      if (*ddpm_options.variance != VarianceType::FixedSmall && *ddpm_options.variance != VarianceType::FixedLarge)
        throw UsageError("--variance: '" + *variance + "' (expected fixed_small or fixed_large)");
    }
    ddpm_options.seed = seed;
    ddpm_options.seeds = seeds;
    ddpm_options.clip_sample = options.clip_sample;
  } else if (args.given("--variance")) {
    throw UsageError("--variance applies to --sampler ddpm only");
  }
  if (noise_path && eta == 0.0 && !ddpm) {
    throw UsageError("--noise needs --eta > 0 (with eta = 0 no noise is added)");
  }

  // The outputs: checked and registered now (two options naming one file are refused), written
  // all or nothing at the end.
  tools::OutputFiles outputs;
  const std::optional<std::string> out_dir = args.get("--out-dir");
  // The default --out applies only when --out-dir is not given either.
  const std::optional<std::string> out = args.given("--out") || !out_dir ? args.get("--out") : std::nullopt;
  const bool out_png = out && output_extension(*out, "--out", {".png", ".npy"}) == ".png";
  const std::optional<std::string> trajectory_path = args.get("--trajectory");
  const std::optional<std::string> x0_path = args.get("--x0");
  if (trajectory_path) output_extension(*trajectory_path, "--trajectory", {".npy"});
  if (x0_path) output_extension(*x0_path, "--x0", {".npy"});
  if (out) outputs.add(*out, "--out");
  if (trajectory_path) outputs.add(*trajectory_path, "--trajectory");
  if (x0_path) outputs.add(*x0_path, "--x0");
  if (out_dir) {
    std::error_code ec;
    if (std::filesystem::exists(*out_dir, ec) && !std::filesystem::is_directory(*out_dir, ec)) {
      throw Error(ErrorCode::Io, "--out-dir: " + format::quote_path(*out_dir) + " exists and is not a directory");
    }
  }

  // ---- the model and the inputs (their declared shapes checked before their data is read)
  const std::shared_ptr<const Model> model = Model::load(model_path);
  const ModelInfo& info = model->info();
  // The sampled space (latents for a latent model: --height/--width are then the image's pixels).
  const std::int64_t channels = info.in_channels;
  const std::int64_t factor = info.is_latent() ? info.latent.factor : 1;
  if (!info.is_latent() && args.given("--decode")) throw UsageError("--decode applies to latent models only");
  if (session_options.height > 0 && (session_options.height % factor || session_options.width % factor)) {
    throw UsageError("--height/--width are the decoded image's pixels and must be multiples of the decoder's factor " +
                     std::to_string(factor));
  }
  const std::int64_t height = session_options.height > 0 ? session_options.height / factor : info.height;
  const std::int64_t width = session_options.width > 0 ? session_options.width / factor : info.width;
  const std::int64_t out_channels = info.is_latent() && session_options.decode ? info.latent.image_channels : channels;
  if ((out_png || out_dir) && out_channels != 1 && out_channels != 3) {
    throw Error(ErrorCode::InvalidArgument, "the " + std::string(info.is_latent() && !session_options.decode ? "latents" : "samples") +
                                                " have " + std::to_string(out_channels) +
                                                " channels, which a PNG cannot hold; use --out FILE.npy");
  }

  int batch = batch_option;
  tools::NpyArray x_T;
  if (x_T_path) {
    const std::string what = "--x-T " + format::quote_path(*x_T_path);
    x_T = tools::read_npy_f32(*x_T_path, [&](std::span<const std::int64_t> shape) {
      if (shape.size() == 4 && (shape[0] < 1 || shape[0] > kMaxBatch)) {
        throw Error(ErrorCode::InvalidArgument, what + ": batch " + std::to_string(shape[0]) + " is out of range [1, " +
                                                    std::to_string(kMaxBatch) + "]");
      }
      check_shape(shape, std::vector<std::int64_t>{-1, channels, height, width}, what,
                  "(N, C, H, W) with the model's channels and the sample size");
      if ((args.given("--batch") || !seeds.empty()) && shape[0] != batch_option) {
        throw Error(ErrorCode::InvalidArgument, std::string(seeds.empty() ? "--batch " : "--seeds' count ") +
                                                    std::to_string(batch_option) + " disagrees with " + what +
                                                    ", which holds " + std::to_string(shape[0]) + " samples");
      }
    });
    check_finite(x_T.data, what);
    batch = static_cast<int>(x_T.shape[0]);
    options.x_T = x_T.data;
  }
  // One class label per sample sets the batch when nothing else does.
  if (const int labelled = conditioning_batch(options.conditioning); labelled > 0) {
    if (!args.given("--batch") && seeds.empty() && !x_T_path) batch = labelled;
    else if (labelled != batch)
      throw UsageError("--class-labels lists " + std::to_string(labelled) + " labels for a batch of " + std::to_string(batch) +
                       " (give one for all or one per sample)");
  }
  if (seeds.empty()) check_seed_range(seed, static_cast<std::uint64_t>(batch), "--seed");
  if (!ddpm) check_conditioning(*model, options.conditioning, batch);
  else if (!info.class_kind.empty())
    throw UsageError("--sampler ddpm takes no class labels; the model is class-conditional (use --sampler ddim)");

  // The timesteps this run visits (the same computation the session makes), for --noise.
  TimestepPlan plan;
  if (ddpm) {
    for (int t = model->schedule().num_train_timesteps - 1; t >= 0; --t) plan.timesteps.push_back(t);
  } else {
    plan = plan_timesteps(*model, args, steps, options.spacing, options.timesteps, options.steps_offset);
  }
  const auto visited = static_cast<std::int64_t>(plan.timesteps.size());
  tools::NpyArray noise;
  if (noise_path) {
    const std::string what = "--noise " + format::quote_path(*noise_path);
    noise = tools::read_npy_f32(*noise_path, [&](std::span<const std::int64_t> shape) {
      check_shape(shape, std::vector<std::int64_t>{visited, batch, channels, height, width}, what,
                  "(S, N, C, H, W), one slice for each of the " + std::to_string(visited) + " timesteps visited (" +
                      join_bounded(plan.timesteps) + ") and each of the " + std::to_string(batch) + " samples");
    });
    check_finite(noise.data, what);
    options.noise = noise.data;
  }
  options.want_trajectory = trajectory_path.has_value();
  options.want_x0 = x0_path.has_value();
  ddpm_options.x_T = options.x_T;
  ddpm_options.noise = options.noise;
  ddpm_options.want_trajectory = options.want_trajectory;
  ddpm_options.want_x0 = options.want_x0;

  // --out-dir: one file per sample, <seed>_<index>.png, registered with the others.
  std::vector<std::filesystem::path> per_image_paths;
  if (out_dir) {
    outputs.make_directory(*out_dir, "--out-dir");
    for (int i = 0; i < batch; ++i) {
      const std::uint64_t image_seed = seeds.empty() ? seed + static_cast<std::uint64_t>(i) : seeds[static_cast<std::size_t>(i)];
      per_image_paths.push_back(std::filesystem::path(*out_dir) / (std::to_string(image_seed) + "_" + std::to_string(i) + ".png"));
      outputs.add(per_image_paths.back(), "--out-dir");
    }
  }

  // ---- sample
  session_options.batch = batch;
  const std::unique_ptr<Session> session =
      create_session(model, session_options, "--height/--width", true, args, {"--autotune", "--profile"});
  const PlanInfo& plan_info = session->plan_info();
  if (isatty(STDERR_FILENO)) options.progress = ddpm_options.progress = make_progress_bar();
  const auto start = std::chrono::steady_clock::now();
  const SampleResult result = ddpm ? session->sample_ddpm(ddpm_options) : session->sample(options);
  const double seconds = seconds_since(start);
  if (!result.warning.empty()) warn(result.warning);
  for (const std::string& w : session->plan_info().warnings) warn(w);

  const std::int64_t S = static_cast<std::int64_t>(result.timesteps.size());
  const std::int64_t n = result.n, c = result.c, h = result.h, w = result.w;
  const std::int64_t lc = result.latent_c, lh = result.latent_h, lw = result.latent_w;  // trajectory, x0
  const auto expect_size = [](const std::vector<float>& data, std::int64_t count, const char* what) {
    if (data.size() != static_cast<std::size_t>(count)) {
      throw Error(ErrorCode::Internal, std::string("the session returned ") + std::to_string(data.size()) + " " + what +
                                           " values; expected " + std::to_string(count));
    }
  };
  expect_size(result.images, n * c * h * w, "image");
  if (n != batch) throw Error(ErrorCode::Internal, "the session returned " + std::to_string(n) + " samples");

  // ---- outputs: every file written to its temporary first, then all renamed
  const std::string spacing_name = ddpm ? "all"
                                   : options.timesteps.empty()
                                       ? to_string(options.spacing.value_or(model->schedule().timestep_spacing))
                                       : "custom";
  tools::TextChunks common_text = {
      {"Software", version_string()},
      {"steps", std::to_string(S)},
      {"sampler", sampler},
      {"eta", ddpm ? std::string("-") : format_real(eta)},
      {"spacing", spacing_name},
      {"timesteps", join(result.timesteps)},
      {"model", model_path.string()},
  };
  if (x_T_path) common_text.emplace_back("x_T", *x_T_path);
  if (noise_path) common_text.emplace_back("noise", *noise_path);

  if (out) {
    const std::int64_t shape[] = {n, c, h, w};
    if (out_png) {
      tools::TextChunks text = common_text;
      if (seeds.empty()) text.emplace_back("seed", std::to_string(seed));
      else text.emplace_back("seeds", join(seeds));
      text.emplace_back("batch", std::to_string(n));
      outputs.stage(*out, tools::encode_png(tools::batch_to_grid(result.images, result.n, result.c, result.h, result.w), text));
    } else {
      outputs.stage(*out, tools::encode_npy_f32(shape, result.images));
    }
  }
  if (out_dir) {
    const std::size_t per_image = static_cast<std::size_t>(c * h * w);
    for (int i = 0; i < result.n; ++i) {
      const std::uint64_t image_seed = seeds.empty() ? seed + static_cast<std::uint64_t>(i) : seeds[static_cast<std::size_t>(i)];
      tools::TextChunks text = common_text;
      text.emplace_back("seed", std::to_string(image_seed));
      text.emplace_back("index", std::to_string(i));
      const std::span<const float> image(result.images.data() + per_image * static_cast<std::size_t>(i), per_image);
      outputs.stage(per_image_paths[static_cast<std::size_t>(i)],
                    tools::encode_png(tools::tensor_to_image(image, result.c, result.h, result.w), text));
    }
  }
  if (trajectory_path) {
    expect_size(result.trajectory, (S + 1) * n * lc * lh * lw, "trajectory");
    const std::int64_t shape[] = {S + 1, n, lc, lh, lw};
    outputs.stage(*trajectory_path, tools::encode_npy_f32(shape, result.trajectory));
  }
  if (x0_path) {
    expect_size(result.x0, S * n * lc * lh * lw, "x0");
    const std::int64_t shape[] = {S, n, lc, lh, lw};
    outputs.stage(*x0_path, tools::encode_npy_f32(shape, result.x0));
  }
  outputs.commit();

  std::string written;
  if (out) written = *out;
  if (out_dir) written += (written.empty() ? "" : ", ") + *out_dir + "/";
  const std::string kind = ddpm ? std::string("DDPM, ") + to_string(ddpm_options.variance.value_or(
                                                             model->schedule().variance_type))
                                : "eta " + format_real(eta);
  if (!plan_info.decoder.empty()) std::fprintf(stderr, "ddim: decoder %s\n", one_line(plan_info.decoder).c_str());
  std::fprintf(stderr, "ddim: %lld samples %lldx%lldx%lld, %lld steps (%s) on %s %s in %.3f s (%.1f ms/step) -> %s\n",
               static_cast<long long>(n), static_cast<long long>(c), static_cast<long long>(h),
               static_cast<long long>(w), static_cast<long long>(S), kind.c_str(),
               plan_info.backend.c_str(), plan_info.precision.c_str(), seconds,
               S > 0 ? 1000.0 * seconds / static_cast<double>(S) : 0.0, one_line(written).c_str());
  return 0;
}

}  // namespace ddim::cli
