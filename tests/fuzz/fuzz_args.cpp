// fuzz_args: the ddim tool's command line. The input is a NUL-separated argument list; the first
// byte chooses the subcommand. The parsed options are then read the way the commands read them:
// every option as an integer, a real, a seed, on/off, an integer and a seed list, and the shared
// session and timestep options. Usage errors (cli::UsageError) and ddim::Error are the accepted
// rejections.
#include <string>
#include <vector>

#include "commands.hpp"
#include "fuzz_common.hpp"

namespace {
const ddim::cli::CommandSpec* const kCommands[] = {
    &ddim::cli::kSampleCommand,      &ddim::cli::kForwardCommand, &ddim::cli::kInfoCommand,    &ddim::cli::kInvertCommand,
    &ddim::cli::kInterpolateCommand, &ddim::cli::kCompareCommand, &ddim::cli::kEtaStudyCommand};

bool has_option(const ddim::cli::CommandSpec& spec, std::string_view name) {
  for (const ddim::cli::OptionSpec& o : spec.options)
    if (o.name == name) return true;
  return false;
}

template <typename F>
void accept_usage_errors(F&& f) {
  ddim::fuzz::expect_only_ddim_errors("fuzz_args", [&] {
    try {
      f();
    } catch (const ddim::cli::UsageError&) {
    }
  });
}
}  // namespace

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  if (data.empty()) return 0;
  const ddim::cli::CommandSpec& spec = *kCommands[data[0] % std::size(kCommands)];
  std::vector<std::string> args;
  std::string current;
  for (std::size_t i = 1; i < data.size(); ++i) {
    if (data[i] == 0) {
      args.push_back(std::move(current));
      current.clear();
    } else {
      current.push_back(char(data[i]));
    }
  }
  if (data.size() > 1) args.push_back(std::move(current));
  accept_usage_errors([&] {
    const ddim::cli::ParsedArgs parsed = ddim::cli::parse_args(spec, args);
    for (const ddim::cli::OptionSpec& o : spec.options) {
      if (!parsed.get(o.name)) continue;
      accept_usage_errors([&] { (void)parsed.integer(o.name, -1000000, 1000000); });
      accept_usage_errors([&] { (void)parsed.real(o.name, -1e9, 1e9); });
      accept_usage_errors([&] { (void)parsed.u64(o.name); });
      accept_usage_errors([&] { (void)parsed.on_off(o.name); });
      const std::string value = parsed.str(o.name);
      accept_usage_errors([&] { (void)ddim::cli::parse_int_list(value, o.name, 0, 1000000); });
      accept_usage_errors([&] { (void)ddim::cli::parse_u64_list(value, o.name); });
    }
    if (has_option(spec, "--device") && has_option(spec, "--precision") && has_option(spec, "--threads"))
      accept_usage_errors([&] { (void)ddim::cli::session_options_from(parsed); });
    if (has_option(spec, "--steps") && has_option(spec, "--spacing") && has_option(spec, "--timesteps") &&
        parsed.get("--steps")) {
      accept_usage_errors([&] {
        std::optional<ddim::Spacing> spacing;
        std::vector<int> timesteps;
        ddim::cli::read_timestep_options(parsed, parsed.integer("--steps", 1, 100000), spacing, timesteps);
      });
    }
    (void)ddim::cli::format_help(spec);
  });
  return 0;
}
