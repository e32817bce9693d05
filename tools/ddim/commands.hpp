#pragma once
// The ddim tool's subcommands (one .cpp each, with its option table) and their shared helpers.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "args.hpp"
#include "ddim/session.hpp"

namespace ddim::cli {

extern const CommandSpec kSampleCommand;
extern const CommandSpec kForwardCommand;
extern const CommandSpec kInfoCommand;
extern const CommandSpec kInvertCommand;
extern const CommandSpec kInterpolateCommand;
extern const CommandSpec kCompareCommand;
extern const CommandSpec kEtaStudyCommand;

// Each returns the process exit code; errors are thrown (UsageError, ddim::Error).
int run_sample(const ParsedArgs& args);
int run_forward(const ParsedArgs& args);
int run_info(const ParsedArgs& args);
int run_invert(const ParsedArgs& args);
int run_interpolate(const ParsedArgs& args);
int run_compare(const ParsedArgs& args);
int run_eta_study(const ParsedArgs& args);

// "ddim 0.1.0".
std::string version_string();

// --device auto|cpu|cuda|cuda:N and --precision auto|fp32|fp16|bf16 into session options.
void apply_device(const std::string& text, SessionOptions& options);

// The session options every subcommand shares: --device, --precision, --threads.
SessionOptions session_options_from(const ParsedArgs& args);

// Reads --spacing and --timesteps (a custom list, which must agree with an explicit --steps) for
// sample, invert and interpolate. Throws UsageError.
void read_timestep_options(const ParsedArgs& args, int steps, std::optional<Spacing>& spacing, std::vector<int>& timesteps);
Precision parse_precision_option(const std::string& text);

// Throws ddim::Error(Io) early (before any long computation) when `path` cannot be an output
// file: its directory is missing or it names a directory.
void check_output_path(const std::filesystem::path& path, std::string_view option);
// Lower-cased extension (".png", ".npy").
std::string extension_of(const std::filesystem::path& path);

// Shape checks of an input array: `expected` entries < 0 match anything.
void check_shape(std::span<const std::int64_t> shape, std::span<const std::int64_t> expected, const std::string& what,
                 const std::string& meaning);
// ddim::Error(InvalidArgument) when the data holds NaN or Inf.
void check_finite(std::span<const float> data, const std::string& what);

// "999,979,959": a timestep list as the options take it.
std::string join(const std::vector<int>& values);
std::string join(const std::vector<std::uint64_t>& values);

// A one-line progress bar on stderr (for use when stderr is a terminal).
ProgressCallback make_progress_bar();

// Seconds since `start`.
double seconds_since(std::chrono::steady_clock::time_point start);
// "12.3 MiB".
std::string format_bytes(std::uint64_t bytes);

}  // namespace ddim::cli
