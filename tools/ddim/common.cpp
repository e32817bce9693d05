// Helpers shared by the ddim subcommands.
#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <system_error>

#include "commands.hpp"
#include "ddim/error.hpp"
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
  options.threads = args.integer("--threads", 0, 4096);
  return options;
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

void check_output_path(const std::filesystem::path& path, std::string_view option) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    throw Error(ErrorCode::Io, std::string(option) + ": '" + path.string() + "' is a directory");
  }
  const std::filesystem::path dir = path.parent_path();
  if (!dir.empty() && !std::filesystem::is_directory(dir, ec)) {
    throw Error(ErrorCode::Io, std::string(option) + ": cannot write '" + path.string() + "': directory '" +
                                   dir.string() + "' does not exist");
  }
}

std::string extension_of(const std::filesystem::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext;
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

}  // namespace ddim::cli
