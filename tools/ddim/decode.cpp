// ddim decode: a latent model's decoder alone, on given latents (e.g. to compare with diffusers'
// vae.decode from identical latents), output to .npy or a .png grid.
#include <chrono>
#include <cstdio>
#include <optional>
#include <set>

#include "commands.hpp"
#include "ddim/error.hpp"
#include "ddim/model.hpp"
#include "files.hpp"
#include "format/input_file.hpp"
#include "npy.hpp"
#include "png.hpp"

namespace ddim::cli {
namespace {

constexpr OptionSpec kOptions[] = {
    {"--model", "FILE", "", "a latent model file (format version 2, with a decoder)", true},
    {"--latents", "FILE", "", "input: float32 (N, C, h, w) .npy latents as the U-Net samples them (before the division by "
                              "scaling_factor, which decode applies)", true},
    {"--out", "FILE", "decoded.npy", "output: float32 (N, C_img, f*h, f*w) .npy of the raw decoder output, or a .png grid"},
    {"--dump", "DIR", "", "also write every decoder node's output to DIR/<node>.npy, listed in graph order in DIR/nodes.txt"},
    {"--device", "DEV", "auto", "auto|cpu|cuda|cuda:N"},
    {"--precision", "P", "auto", "auto|fp32|fp16|bf16; auto is fp16 on CUDA, fp32 on the CPU"},
    {"--threads", "N", "0", "CPU worker threads (at most 1024), 0 for all cores"},
};

}  // namespace

const CommandSpec kDecodeCommand{"decode", "", "Run a latent model's decoder on given latents.", kOptions};

int run_decode(const ParsedArgs& args) {
  const std::filesystem::path model_path = args.str("--model");
  const std::string latents_path = args.str("--latents");
  const std::string out = args.str("--out");
  const bool png = output_extension(out, "--out", {".npy", ".png"}) == ".png";
  SessionOptions session_options = session_options_from(args);
  tools::OutputFiles outputs;
  outputs.add(out, "--out");
  const std::optional<std::string> dump_dir = args.get("--dump");
  if (dump_dir) {
    std::error_code ec;
    if (std::filesystem::exists(*dump_dir, ec) && !std::filesystem::is_directory(*dump_dir, ec))
      throw Error(ErrorCode::Io, "--dump: " + format::quote_path(*dump_dir) + " exists and is not a directory");
  }

  const std::shared_ptr<const Model> model = Model::load(model_path);
  const ModelInfo& info = model->info();
  if (!info.is_latent())
    throw Error(ErrorCode::InvalidArgument, "--model " + format::quote_path(model_path.string()) +
                                                " is a pixel-space model: it has no decoder (re-export a latent pipeline with "
                                                "tools/export.py)");
  const std::string what = "--latents " + format::quote_path(latents_path);
  const tools::NpyArray x = tools::read_npy_f32(latents_path, [&](std::span<const std::int64_t> shape) {
    check_shape(shape, std::vector<std::int64_t>{-1, info.in_channels, -1, -1}, what,
                "(N, C, h, w) with the model's " + std::to_string(info.in_channels) + " latent channels");
    if (shape[0] < 1 || shape[0] > kMaxBatch || shape[2] < 1 || shape[3] < 1 ||
        shape[2] * info.latent.factor > kMaxSampleSize || shape[3] * info.latent.factor > kMaxSampleSize)
      throw Error(ErrorCode::InvalidArgument, what + " has shape " + tools::shape_to_string(shape) + ": N must be in [1, " +
                                                  std::to_string(kMaxBatch) + "], the decoded size at most " +
                                                  std::to_string(kMaxSampleSize));
  });
  check_finite(x.data, what);
  const int n = static_cast<int>(x.shape[0]);
  const int f = info.latent.factor;
  session_options.batch = n;
  session_options.height = static_cast<int>(x.shape[2]) * f;
  session_options.width = static_cast<int>(x.shape[3]) * f;
  const std::int64_t c = info.latent.image_channels;
  if (png && c != 1 && c != 3)
    throw Error(ErrorCode::InvalidArgument, "the decoded images have " + std::to_string(c) + " channels, which a PNG cannot hold");
  const std::unique_ptr<Session> session = create_session(model, session_options, what, false, args);

  if (dump_dir) outputs.make_directory(*dump_dir, "--dump");
  std::string manifest;
  std::size_t dumped = 0;
  std::set<std::string> used_names;
  const Session::NodeOutputCallback dump = [&](const std::string& node, const std::vector<std::int64_t>& shape,
                                               std::span<const float> values) {
    const std::string file = dump_file_name(node, dumped, used_names);
    const std::filesystem::path path = std::filesystem::path(*dump_dir) / file;
    outputs.add(path, "--dump");
    outputs.stage(path, tools::encode_npy_f32(shape, values));
    manifest += std::to_string(dumped++) + "\t" + one_line(node, 4096) + "\t" + tools::shape_to_string(shape) + "\t" + file + "\n";
  };
  const auto start = std::chrono::steady_clock::now();
  const std::vector<float> y = dump_dir ? session->decode(x.data, dump) : session->decode(x.data);
  const double seconds = seconds_since(start);
  const std::int64_t shape[] = {n, c, x.shape[2] * f, x.shape[3] * f};
  if (y.size() != static_cast<std::size_t>(shape[0] * shape[1] * shape[2] * shape[3]))
    throw Error(ErrorCode::Internal, "the session returned " + std::to_string(y.size()) + " values; expected " +
                                         tools::shape_to_string(shape));
  if (png) {
    tools::TextChunks text = {{"Software", version_string()}, {"model", model_path.string()}, {"latents", latents_path}};
    outputs.stage(out, tools::encode_png(tools::batch_to_grid(y, n, int(c), int(shape[2]), int(shape[3])), text));
  } else {
    outputs.stage(out, tools::encode_npy_f32(shape, y));
  }
  if (dump_dir) {
    const std::filesystem::path nodes = std::filesystem::path(*dump_dir) / "nodes.txt";
    outputs.add(nodes, "--dump");
    outputs.stage(nodes, std::span(reinterpret_cast<const std::uint8_t*>(manifest.data()), manifest.size()));
  }
  outputs.commit();
  std::fprintf(stderr, "ddim: decoded %s on %s in %.3f ms -> %s %s\n", tools::shape_to_string(x.shape).c_str(),
               session->plan_info().decoder.c_str(), 1000.0 * seconds, one_line(out).c_str(),
               tools::shape_to_string(shape).c_str());
  if (dump_dir) std::fprintf(stderr, "ddim: %zu node outputs -> %s/ (listed in nodes.txt)\n", dumped, one_line(*dump_dir).c_str());
  return 0;
}

}  // namespace ddim::cli
