// ddim: command-line front end of the ddim engine.
//
// Exit codes: 0 success; 1 a ddim::Error or other failure while running; 2 a command-line
// mistake (unknown command or option, missing or malformed value). Errors are one line on
// stderr: "ddim: error: ...".
#include <exception>
#include <iostream>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include "args.hpp"
#include "commands.hpp"
#include "ddim/error.hpp"

namespace {

using ddim::cli::CommandSpec;
using ddim::cli::ParsedArgs;

struct Command {
  const CommandSpec* spec;
  int (*run)(const ParsedArgs&);
};

const Command kCommands[] = {
    {&ddim::cli::kSampleCommand, ddim::cli::run_sample},
    {&ddim::cli::kForwardCommand, ddim::cli::run_forward},
    {&ddim::cli::kInvertCommand, ddim::cli::run_invert},
    {&ddim::cli::kInterpolateCommand, ddim::cli::run_interpolate},
    {&ddim::cli::kCompareCommand, ddim::cli::run_compare},
    {&ddim::cli::kEtaStudyCommand, ddim::cli::run_eta_study},
    {&ddim::cli::kInfoCommand, ddim::cli::run_info},
};

const Command* find_command(std::string_view name) {
  for (const Command& command : kCommands) {
    if (command.spec->name == name) return &command;
  }
  return nullptr;
}

std::string global_usage() {
  std::string out = "usage: ddim <command> [options]\n       ddim <command> --help\n       ddim --version\n\ncommands:\n";
  for (const Command& command : kCommands) {
    std::string name(command.spec->name);
    out += "  " + name + std::string(name.size() < 12 ? 13 - name.size() : 1, ' ') + std::string(command.spec->summary) + "\n";
  }
  return out;
}

std::string global_help() {
  std::string out = global_usage();
  for (const Command& command : kCommands) out += "\n" + ddim::cli::format_help(*command.spec);
  return out;
}

bool wants_help(const std::vector<std::string>& args) {
  for (const std::string& arg : args) {
    if (arg == "--") return false;
    if (arg == "-h" || arg == "--help") return true;
  }
  return false;
}

int run(const std::vector<std::string>& argv) {
  if (argv.empty()) {
    std::cerr << global_usage() << "\n";
    throw ddim::cli::UsageError("no command given; see 'ddim --help'");
  }
  const std::string& first = argv.front();
  if (first == "-h" || first == "--help") {
    std::cout << global_help();
    return 0;
  }
  if (first == "--version" || first == "-V") {
    std::cout << ddim::cli::version_string() << "\n";
    return 0;
  }
  if (first == "help") {
    if (argv.size() == 1) {
      std::cout << global_help();
      return 0;
    }
    const Command* command = find_command(argv[1]);
    if (command == nullptr) throw ddim::cli::UsageError("unknown command '" + argv[1] + "'; see 'ddim --help'");
    std::cout << ddim::cli::format_help(*command->spec);
    return 0;
  }
  const Command* command = find_command(first);
  if (command == nullptr) {
    if (!first.empty() && first[0] == '-') throw ddim::cli::UsageError("unknown option '" + first + "'; see 'ddim --help'");
    throw ddim::cli::UsageError("unknown command '" + first + "'; see 'ddim --help'");
  }
  const std::vector<std::string> rest(argv.begin() + 1, argv.end());
  if (wants_help(rest)) {
    std::cout << ddim::cli::format_help(*command->spec);
    return 0;
  }
  return command->run(ddim::cli::parse_args(*command->spec, rest));
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const ddim::cli::UsageError& e) {
    std::cerr << "ddim: error: " << e.what() << "\n";
    return 2;
  } catch (const ddim::Error& e) {
    std::cerr << "ddim: error: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "ddim: error: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "ddim: error: " << e.what() << "\n";
    return 1;
  } catch (...) {
    std::cerr << "ddim: error: unknown exception\n";
    return 1;
  }
}
