// Option-table driven argument parsing and help text for the ddim tool.
#include "args.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>
#include <system_error>

namespace ddim::cli {
namespace {

std::string quoted(std::string_view s) { return "'" + std::string(s) + "'"; }

// Levenshtein distance, for "did you mean" hints.
std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

const OptionSpec* find_option(const CommandSpec& spec, std::string_view name) {
  for (const OptionSpec& option : spec.options) {
    if (option.name == name) return &option;
  }
  return nullptr;
}

std::string format_real(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

}  // namespace

std::int64_t parse_int(std::string_view text, std::string_view what, std::int64_t min, std::int64_t max) {
  std::int64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range || (ec == std::errc() && ptr == end && (value < min || value > max))) {
    throw UsageError(std::string(what) + ": " + quoted(text) + " is out of range [" + std::to_string(min) + ", " +
                     std::to_string(max) + "]");
  }
  if (ec != std::errc() || ptr != end || text.empty()) {
    throw UsageError(std::string(what) + ": " + quoted(text) + " is not an integer");
  }
  return value;
}

double parse_real(std::string_view text, std::string_view what, double min, double max) {
  double value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range || (ec == std::errc() && ptr == end && std::isfinite(value) &&
                                               (value < min || value > max))) {
    throw UsageError(std::string(what) + ": " + quoted(text) + " is out of range [" + format_real(min) + ", " +
                     format_real(max) + "]");
  }
  if (ec != std::errc() || ptr != end || text.empty() || !std::isfinite(value)) {
    throw UsageError(std::string(what) + ": " + quoted(text) + " is not a finite number");
  }
  return value;
}

std::vector<int> parse_int_list(std::string_view text, std::string_view what, int min, int max) {
  std::vector<int> values;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string_view item = text.substr(start, comma == std::string_view::npos ? text.npos : comma - start);
    const std::string label = std::string(what) + " entry " + std::to_string(values.size() + 1);
    values.push_back(static_cast<int>(parse_int(item, label, min, max)));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return values;
}

ParsedArgs::ParsedArgs(const CommandSpec& spec, std::map<std::string, std::string, std::less<>> values,
                       std::vector<std::string> positionals)
    : spec_(&spec), values_(std::move(values)), positionals_(std::move(positionals)) {}

const OptionSpec& ParsedArgs::spec_of(std::string_view name) const {
  const OptionSpec* option = find_option(*spec_, name);
  // A name missing from the table is a bug in the tool, not a user error.
  if (option == nullptr) throw std::logic_error("ddim cli: option " + std::string(name) + " is not in the table");
  return *option;
}

bool ParsedArgs::given(std::string_view name) const {
  spec_of(name);
  return values_.find(name) != values_.end();
}

bool ParsedArgs::has(std::string_view name) const { return find_option(*spec_, name) != nullptr; }

std::optional<std::string> ParsedArgs::get(std::string_view name) const {
  const OptionSpec& option = spec_of(name);
  if (auto it = values_.find(name); it != values_.end()) return it->second;
  if (!option.default_value.empty()) return std::string(option.default_value);
  return std::nullopt;
}

std::string ParsedArgs::str(std::string_view name) const {
  std::optional<std::string> value = get(name);
  if (!value) throw UsageError("missing required option " + std::string(name));
  return *value;
}

int ParsedArgs::integer(std::string_view name, std::int64_t min, std::int64_t max) const {
  return static_cast<int>(parse_int(str(name), name, std::max<std::int64_t>(min, std::numeric_limits<int>::min()),
                                    std::min<std::int64_t>(max, std::numeric_limits<int>::max())));
}

std::uint64_t parse_u64(std::string_view text, std::string_view what) {
  std::uint64_t value = 0;
  const char* end = text.data() + text.size();
  const auto [ptr, ec] = std::from_chars(text.data(), end, value);
  if (ec == std::errc::result_out_of_range) throw UsageError(std::string(what) + ": " + quoted(std::string(text)) + " is too large");
  if (ec != std::errc() || ptr != end || text.empty()) {
    throw UsageError(std::string(what) + ": " + quoted(std::string(text)) + " is not a non-negative integer");
  }
  return value;
}

std::vector<std::uint64_t> parse_u64_list(std::string_view text, std::string_view what) {
  std::vector<std::uint64_t> values;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string_view item = text.substr(start, comma == std::string_view::npos ? text.npos : comma - start);
    values.push_back(parse_u64(item, std::string(what) + " entry " + std::to_string(values.size() + 1)));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  return values;
}

std::uint64_t ParsedArgs::u64(std::string_view name) const { return parse_u64(str(name), name); }

double ParsedArgs::real(std::string_view name, double min, double max) const {
  return parse_real(str(name), name, min, max);
}

std::optional<bool> ParsedArgs::on_off(std::string_view name) const {
  const std::optional<std::string> value = get(name);
  if (!value) return std::nullopt;
  if (*value == "on" || *value == "true" || *value == "yes" || *value == "1") return true;
  if (*value == "off" || *value == "false" || *value == "no" || *value == "0") return false;
  throw UsageError(std::string(name) + ": " + quoted(*value) + " is not on or off");
}

ParsedArgs parse_args(const CommandSpec& spec, std::span<const std::string> args) {
  std::map<std::string, std::string, std::less<>> values;
  std::vector<std::string> positionals;
  bool options_done = false;
  for (std::size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (options_done || arg.size() < 2 || arg[0] != '-' || arg == "-") {
      positionals.push_back(arg);
      continue;
    }
    if (arg == "--") {
      options_done = true;
      continue;
    }
    const std::size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const OptionSpec* option = find_option(spec, name);
    if (option == nullptr) {
      std::string message = "unknown option '" + name + "' for 'ddim " + std::string(spec.name) + "'";
      const OptionSpec* best = nullptr;
      std::size_t best_distance = 3;  // only close matches
      for (const OptionSpec& candidate : spec.options) {
        const std::size_t d = edit_distance(name, candidate.name);
        if (d < best_distance) {
          best = &candidate;
          best_distance = d;
        }
      }
      if (best != nullptr) message += " (did you mean " + std::string(best->name) + "?)";
      throw UsageError(message + "; see 'ddim " + std::string(spec.name) + " --help'");
    }
    if (values.count(name) != 0) throw UsageError("option " + name + " is given more than once");
    if (option->value.empty()) {
      if (eq != std::string::npos) throw UsageError("option " + name + " takes no value");
      values[name] = "";
      continue;
    }
    std::string value;
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else {
      const bool next_is_option = i + 1 < args.size() && args[i + 1].rfind("--", 0) == 0 &&
                                  find_option(spec, args[i + 1].substr(0, args[i + 1].find('='))) != nullptr;
      if (i + 1 >= args.size() || next_is_option) {
        throw UsageError("option " + name + " needs a value (" + std::string(option->value) + ")");
      }
      value = args[++i];
    }
    if (value.empty()) throw UsageError("option " + name + " has an empty value");
    values[name] = std::move(value);
  }
  if (spec.positional.empty() && !positionals.empty()) {
    throw UsageError("unexpected argument '" + positionals.front() + "' for 'ddim " + std::string(spec.name) + "'");
  }
  if (!spec.positional.empty()) {
    if (positionals.empty()) throw UsageError("'ddim " + std::string(spec.name) + "' needs " + std::string(spec.positional));
    if (positionals.size() > 1) throw UsageError("unexpected argument '" + positionals[1] + "'");
  }
  for (const OptionSpec& option : spec.options) {
    if (option.required && values.count(option.name) == 0) {
      throw UsageError("'ddim " + std::string(spec.name) + "' needs " + std::string(option.name) + " " +
                       std::string(option.value));
    }
  }
  return ParsedArgs(spec, std::move(values), std::move(positionals));
}

std::string format_help(const CommandSpec& spec) {
  std::string out = "usage: ddim " + std::string(spec.name);
  if (!spec.positional.empty()) out += " " + std::string(spec.positional);
  out += " [options]\n\n" + std::string(spec.summary) + "\n\noptions:\n";
  std::vector<std::string> left;
  std::size_t width = std::string_view("-h, --help").size();
  for (const OptionSpec& option : spec.options) {
    std::string l = std::string(option.name);
    if (!option.value.empty()) l += " " + std::string(option.value);
    width = std::max(width, l.size());
    left.push_back(std::move(l));
  }
  for (std::size_t i = 0; i < spec.options.size(); ++i) {
    const OptionSpec& option = spec.options[i];
    out += "  " + left[i] + std::string(width - left[i].size() + 2, ' ') + std::string(option.help);
    if (option.required) {
      out += " (required)";
    } else if (!option.default_value.empty()) {
      out += " (default: " + std::string(option.default_value) + ")";
    }
    out += "\n";
  }
  out += "  -h, --help" + std::string(width - 10 + 2, ' ') + "show this help\n";
  return out;
}

}  // namespace ddim::cli
