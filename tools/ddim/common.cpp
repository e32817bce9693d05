// Helpers shared by the ddim subcommands.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <system_error>

#include "commands.hpp"
#include "ddim/error.hpp"
#include "ddim/model.hpp"
#include "format/input_file.hpp"
#include "npy.hpp"

#ifndef DDIM_VERSION
#define DDIM_VERSION "0.1.0"
#endif

namespace ddim::cli {

std::string version_string() { return std::string("ddim ") + DDIM_VERSION; }

SessionOptions session_options_from(const ParsedArgs& args) {
  SessionOptions options;
  apply_device(args.str("--device"), options);
  options.precision = parse_precision_option(args.str("--precision"));
  options.threads = args.integer("--threads", 0, kMaxThreads);
  if (options.backend == BackendKind::Cpu && options.precision == Precision::FP16) {
    throw UsageError("--precision " + args.str("--precision") + " needs the CUDA backend; --device cpu computes in fp32 or bf16");
  }
  return options;
}

std::unique_ptr<Session> create_session(std::shared_ptr<const Model> model, const SessionOptions& options,
                                        const std::string& size_from, bool size_from_option, const ParsedArgs& args,
                                        std::initializer_list<std::string_view> cuda_flags) {
  for (std::string_view flag : cuda_flags) {
    if (args.given(flag) && options.backend == BackendKind::Cpu)
      throw UsageError(std::string(flag) + " applies to the CUDA backend only; it has no effect with --device cpu");
  }
  std::unique_ptr<Session> session;
  try {
    session = Session::create(std::move(model), options);
  } catch (const ddim::Error& e) {
    if (e.code() != ErrorCode::InvalidArgument) throw;
    const std::string message = e.what();
    if (message.rfind("CUDA device", 0) == 0) throw UsageError("--device " + args.str("--device") + ": " + message);
    if (message.rfind("sample size", 0) == 0) {
      if (size_from_option) throw UsageError(size_from + ": " + message);
      throw Error(ErrorCode::InvalidArgument, size_from + ": " + message);
    }
    throw;
  }
  const PlanInfo& plan = session->plan_info();
  if (!plan.fallback.empty()) warn("running on the CPU: the CUDA backend failed: " + plan.fallback);
  if (session->backend() == BackendKind::Cpu) {
    for (std::string_view flag : cuda_flags)
      if (args.given(flag)) warn(std::string(flag) + " has no effect: the session runs on the CPU");
  }
  return session;
}

TimestepPlan plan_timesteps(const Model& model, const ParsedArgs& args, int steps, const std::optional<Spacing>& spacing,
                            const std::vector<int>& timesteps, std::optional<int> steps_offset) {
  const Scheduler scheduler(model.schedule());
  try {
    if (!timesteps.empty()) return scheduler.custom_timesteps(timesteps);
    return scheduler.timesteps(steps, spacing, steps_offset);
  } catch (const ddim::Error& e) {
    if (e.code() != ErrorCode::InvalidArgument) throw;
    std::string option;
    if (!timesteps.empty()) {
      option = "--timesteps";
    } else {
      option = "--steps " + std::to_string(steps);
      if (args.has("--spacing") && args.given("--spacing")) option += " --spacing " + args.str("--spacing");
      if (steps_offset && args.has("--steps-offset") && args.given("--steps-offset"))
        option += " --steps-offset " + std::to_string(*steps_offset);
    }
    std::string message = option + ": " + e.what();
    if (message.find("num_train_timesteps") == std::string::npos)
      message += " (the model has " + std::to_string(model.schedule().num_train_timesteps) + " training timesteps)";
    throw UsageError(message);
  }
}

void check_seed_range(std::uint64_t seed, std::uint64_t count, std::string_view option) {
  const std::uint64_t max = std::numeric_limits<std::uint64_t>::max();
  if (count > 0 && seed > max - (count - 1)) {
    throw UsageError(std::string(option) + " " + std::to_string(seed) + ": sample i uses seed + i, which passes 2^64 - 1 (" +
                     std::to_string(max) + ") for " + std::to_string(count) + " samples; use a seed <= " +
                     std::to_string(max - (count - 1)));
  }
}

void read_timestep_options(const ParsedArgs& args, int steps, std::optional<Spacing>& spacing, std::vector<int>& timesteps) {
  if (const auto text = args.get("--spacing")) {
    try {
      spacing = parse_spacing(*text);
    } catch (const ddim::Error& e) {
      throw UsageError(std::string("--spacing: ") + e.what());
    }
    if (*spacing == Spacing::Custom) throw UsageError("--spacing: use --timesteps for a custom list");
  }
  if (const auto list = args.get("--timesteps")) {
    if (args.given("--spacing")) throw UsageError("--timesteps and --spacing cannot be combined");
    timesteps = parse_int_list(*list, "--timesteps", 0, std::numeric_limits<int>::max());
    if (args.given("--steps") && static_cast<std::size_t>(steps) != timesteps.size())
      throw UsageError("--steps " + std::to_string(steps) + " disagrees with the " + std::to_string(timesteps.size()) +
                       " entries of --timesteps");
  }
}

void apply_device(const std::string& text, SessionOptions& options) {
  const std::size_t colon = text.find(':');
  const std::string kind = text.substr(0, colon);
  try {
    options.backend = parse_backend(kind);
  } catch (const ddim::Error& e) {
    throw UsageError(std::string("--device: ") + e.what());
  }
  options.device = 0;
  if (colon != std::string::npos) {
    if (options.backend != BackendKind::Cuda) {
      throw UsageError("--device: '" + text + "': only cuda takes a device number (cuda:N)");
    }
    options.device = static_cast<int>(parse_int(std::string_view(text).substr(colon + 1), "--device cuda:N", 0, 1023));
  }
}

Precision parse_precision_option(const std::string& text) {
  try {
    return parse_precision(text);
  } catch (const ddim::Error& e) {
    throw UsageError(std::string("--precision: ") + e.what());
  }
}

std::string extension_of(const std::filesystem::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext;
}

std::string output_extension(const std::string& path, std::string_view option, std::initializer_list<std::string_view> allowed) {
  std::string wanted;
  for (std::string_view ext : allowed) wanted += (wanted.empty() ? "" : " or ") + std::string(ext);
  const std::string ext = extension_of(path);
  if (std::find(allowed.begin(), allowed.end(), ext) != allowed.end()) return ext;
  // ".npy" alone is a hidden file named ".npy" with no extension: say so.
  std::string name = std::filesystem::path(path).filename().string();
  std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  if (std::find(allowed.begin(), allowed.end(), name) != allowed.end()) {
    throw UsageError(std::string(option) + ": " + format::quote_path(path) +
                     " has no file name before the extension; give one, e.g. out" + name);
  }
  throw UsageError(std::string(option) + ": " + format::quote_path(path) + " must end in " + wanted);
}

void check_shape(std::span<const std::int64_t> shape, std::span<const std::int64_t> expected, const std::string& what,
                 const std::string& meaning) {
  bool ok = shape.size() == expected.size();
  for (std::size_t i = 0; ok && i < shape.size(); ++i) ok = expected[i] < 0 || shape[i] == expected[i];
  if (ok) return;
  std::string want = "(";
  for (std::size_t i = 0; i < expected.size(); ++i) {
    if (i > 0) want += ", ";
    want += expected[i] < 0 ? std::string("*") : std::to_string(expected[i]);
  }
  want += expected.size() == 1 ? ",)" : ")";
  throw Error(ErrorCode::InvalidArgument, what + " has shape " + tools::shape_to_string(shape) + "; expected " + want +
                                              ": " + meaning);
}

void check_finite(std::span<const float> data, const std::string& what) {
  const auto it = std::find_if(data.begin(), data.end(), [](float v) { return !std::isfinite(v); });
  if (it != data.end()) {
    throw Error(ErrorCode::InvalidArgument, what + " contains NaN or Inf (first at element " +
                                                std::to_string(it - data.begin()) + ")");
  }
}

namespace {
template <class T>
std::string join_values(const std::vector<T>& values) {
  std::string out;
  for (std::size_t i = 0; i < values.size(); ++i) out += (i > 0 ? "," : "") + std::to_string(values[i]);
  return out;
}
}  // namespace

std::string join(const std::vector<int>& values) { return join_values(values); }
std::string join(const std::vector<std::uint64_t>& values) { return join_values(values); }

std::string join_bounded(const std::vector<int>& values, std::size_t max_entries) {
  if (values.size() <= max_entries) return join_values(values);
  const std::vector<int> head(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(max_entries));
  return join_values(head) + ", ... (" + std::to_string(values.size()) + " in all)";
}

std::string one_line(std::string_view text, std::size_t max) {
  std::string out;
  std::size_t i = 0;
  for (; i < text.size() && out.size() < max; ++i) {
    const auto c = static_cast<unsigned char>(text[i]);
    if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  if (i < text.size()) {
    // Do not end inside a UTF-8 sequence.
    while (!out.empty() && (static_cast<unsigned char>(out.back()) & 0xC0u) == 0x80u) out.pop_back();
    if (!out.empty() && static_cast<unsigned char>(out.back()) >= 0xC0u) out.pop_back();
    out += "... (" + std::to_string(text.size() - i) + " more bytes)";
  }
  return out;
}

void warn(const std::string& text) { std::cerr << "ddim: warning: " << one_line(text) << "\n"; }

ProgressCallback make_progress_bar() {
  const auto start = std::chrono::steady_clock::now();
  return [start](int done, int total) {
    constexpr int kWidth = 30;
    const int filled = total > 0 ? std::clamp(done * kWidth / total, 0, kWidth) : kWidth;
    const double elapsed = seconds_since(start);
    const double remaining = done > 0 ? elapsed * (total - done) / done : 0.0;
    std::fprintf(stderr, "\r[%.*s%.*s] %d/%d  %.1fs elapsed, %.1fs left ", filled,
                 "==============================", kWidth - filled, "                              ", done, total,
                 elapsed, remaining);
    if (done >= total) std::fputc('\n', stderr);
    std::fflush(stderr);
    return true;
  };
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string format_bytes(std::uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024.0 && unit < 4) {
    value /= 1024.0;
    ++unit;
  }
  char buf[48];
  if (unit == 0) {
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.1f %s", value, units[unit]);
  }
  return buf;
}

ClassConditioning conditioning_from(const ParsedArgs& args) {
  ClassConditioning c;
  if (const auto list = args.get("--class-labels")) {
    std::size_t start = 0;
    while (true) {
      const std::size_t comma = list->find(',', start);
      const std::string item = list->substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      c.class_labels.push_back(parse_real(item, "--class-labels entry " + std::to_string(c.class_labels.size() + 1), -1e30, 1e30));
      if (c.class_labels.size() > static_cast<std::size_t>(kMaxBatch))
        throw UsageError("--class-labels: more than " + std::to_string(kMaxBatch) + " labels");
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  }
  auto read_vectors = [&](const char* option, bool batched) {
    std::vector<float> out;
    if (const auto path = args.get(option)) {
      const std::string what = std::string(option) + " " + format::quote_path(*path);
      tools::NpyArray a = tools::read_npy_f32(*path, [&](std::span<const std::int64_t> shape) {
        const bool ok = shape.size() == 1 ? shape[0] >= 1 : shape.size() == 2 && shape[0] >= 1 && shape[1] >= 1 &&
                                                                (batched ? shape[0] <= kMaxBatch : shape[0] == 1);
        if (!ok)
          throw Error(ErrorCode::InvalidArgument, what + " has shape " + tools::shape_to_string(shape) + "; expected " +
                                                      (batched ? "(N, D) or (D)" : "(D) or (1, D)"));
      });
      check_finite(a.data, what);
      out = std::move(a.data);
    }
    return out;
  };
  c.class_embeddings = read_vectors("--class-embeddings", true);
  if (!c.class_labels.empty() && !c.class_embeddings.empty())
    throw UsageError("give --class-labels (index and scalar models) or --class-embeddings (vector models), not both");
  c.guidance_scale = args.real("--guidance-scale", 0.0, 1000.0);
  c.guidance_rescale = args.real("--guidance-rescale", 0.0, 1.0);
  if (args.get("--null-class-label")) c.null_class_label = args.real("--null-class-label", -1e30, 1e30);
  c.null_class_embedding = read_vectors("--null-class-embedding", false);
  if (c.null_class_label && !c.null_class_embedding.empty())
    throw UsageError("give --null-class-label or --null-class-embedding, not both");
  return c;
}

void check_conditioning(const Model& model, const ClassConditioning& c, int batch) {
  const ModelInfo& info = model.info();
  const auto number = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.9g", v);
    return std::string(buf);
  };
  if (info.class_kind.empty()) {
    const char* given = !c.class_labels.empty() ? "--class-labels" : !c.class_embeddings.empty() ? "--class-embeddings"
                        : c.guidance_scale != 1.0 ? "--guidance-scale" : c.guidance_rescale != 0.0 ? "--guidance-rescale"
                        : c.null_class_label ? "--null-class-label" : !c.null_class_embedding.empty() ? "--null-class-embedding"
                                                                                                     : nullptr;
    if (given) throw UsageError(std::string(given) + ": the model is unconditional (it takes no class labels)");
    return;
  }
  const std::size_t n = static_cast<std::size_t>(batch), d = static_cast<std::size_t>(info.class_dim);
  if (info.class_kind == "vector") {
    if (!c.class_labels.empty() || c.null_class_label)
      throw UsageError(std::string(c.class_labels.empty() ? "--null-class-label" : "--class-labels") +
                       ": the model takes class embeddings of " + std::to_string(d) + " values (--class-embeddings)");
    if (c.class_embeddings.empty())
      throw UsageError("the model is class-conditional (vector, " + std::to_string(d) + " values): give --class-embeddings");
    if (c.class_embeddings.size() != d && c.class_embeddings.size() != n * d)
      throw UsageError("--class-embeddings holds " + std::to_string(c.class_embeddings.size()) + " values; the model and the batch need (N, D) = (" +
                       std::to_string(n) + ", " + std::to_string(d) + ") or (D)");
    if (!c.null_class_embedding.empty() && c.null_class_embedding.size() != d)
      throw UsageError("--null-class-embedding holds " + std::to_string(c.null_class_embedding.size()) + " values; the model needs D = " +
                       std::to_string(d));
  } else {
    if (!c.class_embeddings.empty() || !c.null_class_embedding.empty())
      throw UsageError(std::string(c.class_embeddings.empty() ? "--null-class-embedding" : "--class-embeddings") +
                       ": the model takes class labels (" + info.class_kind + "), not embeddings");
    if (c.class_labels.empty())
      throw UsageError("the model is class-conditional (" + info.class_kind +
                       (info.class_kind == "index" ? ", " + std::to_string(info.num_classes) + " classes" : std::string()) +
                       "): give --class-labels");
    if (c.class_labels.size() != 1 && c.class_labels.size() != n)
      throw UsageError("--class-labels lists " + std::to_string(c.class_labels.size()) + " labels for a batch of " + std::to_string(n) +
                       " (give one for all or one per sample)");
    auto check_index = [&](double v, const std::string& what) {
      if (info.class_kind == "index" && !(v >= 0 && v < info.num_classes && v == std::floor(v)))
        throw UsageError(what + ": " + number(v) + " is not an integer in [0, " + std::to_string(info.num_classes) + ")");
    };
    for (std::size_t i = 0; i < c.class_labels.size(); ++i) check_index(c.class_labels[i], "--class-labels entry " + std::to_string(i + 1));
    if (c.null_class_label) check_index(*c.null_class_label, "--null-class-label");
  }
  if (c.guidance_scale != 1.0 && info.null_class.empty() && !c.null_class_label && c.null_class_embedding.empty())
    throw UsageError("--guidance-scale " + number(c.guidance_scale) + " needs the unconditional input: give " +
                     (info.class_kind == "vector" ? "--null-class-embedding" : "--null-class-label") +
                     " (the model file records none; tools/export.py can record it)");
}

int conditioning_batch(const ClassConditioning& c) {
  if (c.class_labels.size() > 1) return static_cast<int>(c.class_labels.size());
  return 0;
}

}  // namespace ddim::cli
