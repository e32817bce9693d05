#pragma once
// Command-line parsing for the ddim tool. Each subcommand has ONE option table; the parser, the
// defaults and the --help text all come from it.
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace ddim::cli {

// A mistake on the command line: reported as "ddim: error: ..." with exit code 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct OptionSpec {
  std::string_view name;         // "--steps"
  std::string_view value;        // placeholder ("N"); empty: a flag that takes no value
  std::string_view default_value;  // used when the option is not given; empty: unset
  std::string_view help;         // one line; defaults that are not a literal go here
  bool required = false;
};

struct CommandSpec {
  std::string_view name;        // "sample"
  std::string_view positional;  // "FILE" for one required positional argument; empty: none
  std::string_view summary;     // one line for the command list
  std::span<const OptionSpec> options;
};

class ParsedArgs {
 public:
  ParsedArgs(const CommandSpec& spec, std::map<std::string, std::string, std::less<>> values,
             std::vector<std::string> positionals);

  // Given on the command line (defaults do not count).
  bool given(std::string_view name) const;
  // The command's table has this option (given or not).
  bool has(std::string_view name) const;
  // The value given, else the table's default, else nullopt.
  std::optional<std::string> get(std::string_view name) const;
  // get() that must have a value (required options and those with a default).
  std::string str(std::string_view name) const;
  bool flag(std::string_view name) const { return given(name); }

  // Typed values, checked for full consumption and range; the error names the option.
  int integer(std::string_view name, std::int64_t min, std::int64_t max) const;
  std::uint64_t u64(std::string_view name) const;
  double real(std::string_view name, double min, double max) const;
  // "on" / "off" (also true/false, yes/no, 1/0); nullopt when not given and no default.
  std::optional<bool> on_off(std::string_view name) const;

  const std::vector<std::string>& positionals() const { return positionals_; }

 private:
  const OptionSpec& spec_of(std::string_view name) const;
  const CommandSpec* spec_;
  std::map<std::string, std::string, std::less<>> values_;
  std::vector<std::string> positionals_;
};

// Parses args (without the program and subcommand names). "--name value" and "--name=value";
// an option given twice, an unknown option, a missing value or positional, or a missing
// required option is a UsageError.
ParsedArgs parse_args(const CommandSpec& spec, std::span<const std::string> args);

// The help text of one command: usage line and every option with its default.
std::string format_help(const CommandSpec& spec);

// Number parsing shared with the commands: the whole text must be consumed and in range.
// `what` names the value in the error ("--steps", "--timesteps entry 3").
std::int64_t parse_int(std::string_view text, std::string_view what, std::int64_t min, std::int64_t max);
double parse_real(std::string_view text, std::string_view what, double min, double max);
// "999,750,500": a comma-separated list of integers in [min, max].
std::vector<int> parse_int_list(std::string_view text, std::string_view what, int min, int max);
// "9,2,5": a comma-separated list of non-negative 64-bit integers (seeds).
std::uint64_t parse_u64(std::string_view text, std::string_view what);
std::vector<std::uint64_t> parse_u64_list(std::string_view text, std::string_view what);

}  // namespace ddim::cli
