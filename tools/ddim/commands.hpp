#pragma once
// The ddim tool's subcommands (one .cpp each, with its option table) and their shared helpers.
#include <chrono>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <memory>
#include <optional>
#include <set>
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
extern const CommandSpec kDecodeCommand;

// Each returns the process exit code; errors are thrown (UsageError, ddim::Error).
int run_sample(const ParsedArgs& args);
int run_forward(const ParsedArgs& args);
int run_info(const ParsedArgs& args);
int run_invert(const ParsedArgs& args);
int run_interpolate(const ParsedArgs& args);
int run_compare(const ParsedArgs& args);
int run_eta_study(const ParsedArgs& args);
int run_decode(const ParsedArgs& args);

// A file name for a graph node's --dump output: the node's name when it is made of
// [A-Za-z0-9._-] only, else a sanitised name with `index` appended; never one in `used`.
std::string dump_file_name(const std::string& node, std::size_t index, std::set<std::string>& used);

// "ddim 0.1.0".
std::string version_string();

// --device auto|cpu|cuda|cuda:N and --precision auto|fp32|fp16|bf16 into session options.
void apply_device(const std::string& text, SessionOptions& options);

// The session options every subcommand shares: --device, --precision, --threads (in the engine's
// ranges). A CUDA-only setting (--precision fp16/bf16) with --device cpu is a UsageError.
SessionOptions session_options_from(const ParsedArgs& args);

// Session::create with the command line's names in its errors: a sample size that does not fit
// the network names `size_from` (an option: UsageError; an input file: ddim::Error), an
// unavailable CUDA device names --device. Warns when the CUDA backend failed and `auto` fell back
// to the CPU, and when CUDA-only flags in `cuda_flags` that were given then have no effect.
std::unique_ptr<Session> create_session(std::shared_ptr<const Model> model, const SessionOptions& options,
                                        const std::string& size_from, bool size_from_option, const ParsedArgs& args,
                                        std::initializer_list<std::string_view> cuda_flags = {});

// The timesteps the options select for this model, computed before any work; the engine's range
// errors (more steps than training timesteps, an entry out of range) become UsageErrors naming
// the option (--steps, --timesteps, --spacing, --steps-offset).
TimestepPlan plan_timesteps(const Model& model, const ParsedArgs& args, int steps, const std::optional<Spacing>& spacing,
                            const std::vector<int>& timesteps, std::optional<int> steps_offset);

// --seed S for `count` samples (sample i uses S + i): UsageError when S + count - 1 passes 2^64 - 1.
void check_seed_range(std::uint64_t seed, std::uint64_t count, std::string_view option);

// Reads --spacing and --timesteps (a custom list, which must agree with an explicit --steps) for
// sample, invert and interpolate. Throws UsageError.
void read_timestep_options(const ParsedArgs& args, int steps, std::optional<Spacing>& spacing, std::vector<int>& timesteps);
Precision parse_precision_option(const std::string& text);

// Lower-cased extension (".png", ".npy").
std::string extension_of(const std::filesystem::path& path);
// The lower-cased extension of an output path, which must be one of `allowed`: UsageError naming
// the option otherwise (also for a name that is only an extension, such as ".npy").
std::string output_extension(const std::string& path, std::string_view option,
                             std::initializer_list<std::string_view> allowed);

// Shape checks of an input array: `expected` entries < 0 match anything.
void check_shape(std::span<const std::int64_t> shape, std::span<const std::int64_t> expected, const std::string& what,
                 const std::string& meaning);
// ddim::Error(InvalidArgument) when the data holds NaN or Inf.
void check_finite(std::span<const float> data, const std::string& what);

// The class-conditioning options of sample, forward, invert and interpolate (each command's table
// lists them: kConditioningHelp): --class-labels, --class-embeddings, --guidance-scale,
// --guidance-rescale, --null-class-label, --null-class-embedding. Checks what the command line
// alone can (numbers, files, shapes); the session checks them against the model.
ClassConditioning conditioning_from(const ParsedArgs& args);
// The batch the labels imply: the count of --class-labels when it lists more than one; 0 when
// they fit any batch (one label, or --class-embeddings, whose N the session checks).
int conditioning_batch(const ClassConditioning& c);
// The class options against the model (ModelInfo: its kind, classes, recorded null input) for a
// batch of `batch`: UsageError naming the option for labels an unconditional model cannot take,
// missing labels, the wrong kind, an index outside [0, K), a count that fits no batch, or guidance
// without a null input. (The session checks the same; this names the options.)
void check_conditioning(const Model& model, const ClassConditioning& c, int batch);

// "999,979,959": a timestep list as the options take it.
std::string join(const std::vector<int>& values);
std::string join(const std::vector<std::uint64_t>& values);
// The same for a message: at most `max_entries` values, then ", ... (N in all)".
std::string join_bounded(const std::vector<int>& values, std::size_t max_entries = 8);

// A message as one bounded line: control characters escaped (\n, \xNN), at most `max` bytes
// (then "... (N more bytes)").
std::string one_line(std::string_view text, std::size_t max = 1000);
// "ddim: warning: TEXT" on stderr, TEXT made one line.
void warn(const std::string& text);

// A one-line progress bar on stderr (for use when stderr is a terminal).
ProgressCallback make_progress_bar();

// Seconds since `start`.
double seconds_since(std::chrono::steady_clock::time_point start);
// "12.3 MiB".
std::string format_bytes(std::uint64_t bytes);

}  // namespace ddim::cli
