// ddim forward: one network forward pass on a given x and timestep(s), output to .npy.
#include <charconv>
#include <chrono>
#include <cstdio>
#include <limits>
#include <optional>
#include <set>

#include "commands.hpp"
#include "ddim/error.hpp"
#include "files.hpp"
#include "format/input_file.hpp"
#include "ddim/model.hpp"
#include "npy.hpp"

namespace ddim::cli {
namespace {

constexpr OptionSpec kOptions[] = {
    {"--model", "FILE", "", "model file", true},
    {"--x", "FILE", "", "input: float32 (N, C, H, W) .npy", true},
    {"--t", "T", "", "timestep: an integer for all samples, or a .npy of 1 or N int/float timesteps", true},
    {"--out", "FILE", "eps.npy", "output: the model output, float32 (N, C_out, H, W) .npy"},
    {"--dump", "DIR", "", "also write every graph node's output to DIR/<node>.npy, listed in graph order in DIR/nodes.txt"},
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

// "500" -> {500}; "t.npy" -> its values.
std::vector<int> parse_timesteps(const std::string& text) {
  int value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc() && ptr == end) return {value};
  if (ec == std::errc::result_out_of_range) throw UsageError("--t: '" + text + "' is out of range");
  std::error_code fs_ec;
  if (extension_of(text) == ".npy" || std::filesystem::exists(text, fs_ec)) return tools::read_npy_timesteps(text, kMaxBatch);
  throw UsageError("--t: '" + text + "' is neither an integer nor a .npy file");
}

}  // namespace

// A file name for a node: its name when it is made of [A-Za-z0-9._-] only (state-dict style
// names are), else a sanitised name with the node's index appended; never a duplicate.
std::string dump_file_name(const std::string& node, std::size_t index, std::set<std::string>& used) {
  std::string name = node.substr(0, 200);
  bool changed = name.size() != node.size() || name.empty() || name[0] == '.';
  for (char& ch : name) {
    const bool safe = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' ||
                      ch == '_' || ch == '-';
    if (!safe) {
      ch = '_';
      changed = true;
    }
  }
  if (changed || used.count(name + ".npy") != 0) name = "node_" + name + "_" + std::to_string(index);
  name += ".npy";
  used.insert(name);
  return name;
}

const CommandSpec kForwardCommand{"forward", "", "Run one forward pass of the network (e.g. to compare with PyTorch).",
                                  kOptions};

int run_forward(const ParsedArgs& args) {
  // ---- every command-line check first, before any work
  const std::filesystem::path model_path = args.str("--model");
  const std::string x_path = args.str("--x");
  const std::string out = args.str("--out");
  output_extension(out, "--out", {".npy"});
  SessionOptions session_options = session_options_from(args);
  const ClassConditioning conditioning = conditioning_from(args);
  tools::OutputFiles outputs;
  const std::filesystem::path out_target = outputs.add(out, "--out");
  const std::optional<std::string> dump_dir = args.get("--dump");
  if (dump_dir) {
    std::error_code ec;
    if (std::filesystem::exists(*dump_dir, ec) && !std::filesystem::is_directory(*dump_dir, ec)) {
      throw Error(ErrorCode::Io, "--dump: " + format::quote_path(*dump_dir) + " exists and is not a directory");
    }
    // The dump's files are named after the graph's nodes: --out must not be among them.
    const std::filesystem::path dump_abs = std::filesystem::weakly_canonical(std::filesystem::absolute(*dump_dir), ec);
    if (!ec && out_target.parent_path() == dump_abs.lexically_normal()) {
      throw UsageError("--out " + format::quote_path(out) + " is inside --dump " + format::quote_path(*dump_dir) +
                       ", where the node outputs are written; write it elsewhere");
    }
  }

  // ---- the model and the inputs (the declared shape of x checked before its data is read)
  const std::shared_ptr<const Model> model = Model::load(model_path);
  const ModelInfo& info = model->info();
  const std::string what = "--x " + format::quote_path(x_path);
  const tools::NpyArray x = tools::read_npy_f32(x_path, [&](std::span<const std::int64_t> shape) {
    check_shape(shape, std::vector<std::int64_t>{-1, info.in_channels, -1, -1}, what,
                "(N, C, H, W) with the model's " + std::to_string(info.in_channels) + " input channels");
    if (shape[0] < 1 || shape[0] > kMaxBatch || shape[2] < 1 || shape[2] > kMaxSampleSize || shape[3] < 1 || shape[3] > kMaxSampleSize) {
      throw Error(ErrorCode::InvalidArgument, what + " has shape " + tools::shape_to_string(shape) + ": N must be in [1, " +
                                                  std::to_string(kMaxBatch) + "], H and W in [1, " +
                                                  std::to_string(kMaxSampleSize) + "]");
    }
  });
  check_finite(x.data, what);
  std::vector<int> t = parse_timesteps(args.str("--t"));
  const int n = static_cast<int>(x.shape[0]);
  if (t.size() != 1 && t.size() != static_cast<std::size_t>(n)) {
    throw Error(ErrorCode::InvalidArgument, "--t: " + std::to_string(t.size()) + " timesteps for a batch of " +
                                                std::to_string(n) + " (give 1 or N)");
  }
  const int T = model->schedule().num_train_timesteps;
  for (std::size_t i = 0; i < t.size(); ++i) {
    if (t[i] < 0 || t[i] >= T) {
      throw Error(ErrorCode::InvalidArgument, "--t: timestep " + std::to_string(t[i]) + " (entry " + std::to_string(i) +
                                                  ") is outside the model's range [0, " + std::to_string(T) + ")");
    }
  }

  check_conditioning(*model, conditioning, n);
  session_options.batch = n;
  // A latent model's session takes the decoded image's size; x holds latents.
  const int factor = info.is_latent() ? info.latent.factor : 1;
  session_options.height = static_cast<int>(x.shape[2]) * factor;
  session_options.width = static_cast<int>(x.shape[3]) * factor;
  session_options.decode = false;
  const std::unique_ptr<Session> session = create_session(model, session_options, what, false, args);
  if (dump_dir) outputs.make_directory(*dump_dir, "--dump");
  std::string manifest;  // "index<TAB>node<TAB>shape<TAB>file" per line, graph order
  std::size_t dumped = 0;
  std::set<std::string> used_names;
  const Session::NodeOutputCallback dump = [&](const std::string& node, const std::vector<std::int64_t>& node_shape,
                                               std::span<const float> values) {
    const std::string file = dump_file_name(node, dumped, used_names);
    const std::filesystem::path path = std::filesystem::path(*dump_dir) / file;
    outputs.add(path, "--dump");
    outputs.stage(path, tools::encode_npy_f32(node_shape, values));
    manifest += std::to_string(dumped++) + "\t" + one_line(node, 4096) + "\t" + tools::shape_to_string(node_shape) + "\t" +
                file + "\n";
  };
  const auto start = std::chrono::steady_clock::now();
  const std::vector<float> y = session->forward(x.data, t, conditioning, dump_dir ? dump : Session::NodeOutputCallback{});
  const double seconds = seconds_since(start);

  const std::int64_t shape[] = {x.shape[0], info.out_channels, x.shape[2], x.shape[3]};
  const std::int64_t count = shape[0] * shape[1] * shape[2] * shape[3];
  if (y.size() != static_cast<std::size_t>(count)) {
    throw Error(ErrorCode::Internal, "the session returned " + std::to_string(y.size()) + " values; expected " +
                                         tools::shape_to_string(shape));
  }
  outputs.stage(out, tools::encode_npy_f32(shape, y));
  if (dump_dir) {
    const std::filesystem::path nodes = std::filesystem::path(*dump_dir) / "nodes.txt";
    outputs.add(nodes, "--dump");
    outputs.stage(nodes, std::span(reinterpret_cast<const std::uint8_t*>(manifest.data()), manifest.size()));
  }
  outputs.commit();
  std::fprintf(stderr, "ddim: forward %s on %s %s in %.3f ms -> %s %s\n", tools::shape_to_string(x.shape).c_str(),
               session->plan_info().backend.c_str(), session->plan_info().precision.c_str(), 1000.0 * seconds,
               one_line(out).c_str(), tools::shape_to_string(shape).c_str());
  if (dump_dir) std::fprintf(stderr, "ddim: %zu node outputs -> %s/ (listed in nodes.txt)\n", dumped, one_line(*dump_dir).c_str());
  return 0;
}

}  // namespace ddim::cli
