// ddim: command-line front end of the ddim engine.
//
// Exit codes: 0 success; 1 a ddim::Error or other failure while running (including a failed
// write to standard output); 2 a command-line mistake (unknown command or option, missing or
// malformed value). Errors are one bounded line on stderr: "ddim: error: ...". A reader that
// closes the pipe early (ddim info M | head -1) ends the program quietly (exit 0).
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>
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
    {&ddim::cli::kDecodeCommand, ddim::cli::run_decode},
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
  if (argv.empty()) throw ddim::cli::UsageError("no command given; see 'ddim --help' for the commands");
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

void print_error(std::string_view message) {
  std::cerr << "ddim: error: " << ddim::cli::one_line(message) << "\n" << std::flush;
}

// True when stdout is a pipe or socket whose reader has gone (EPIPE on the next write).
bool stdout_reader_gone() {
  struct stat st {};
  if (::fstat(STDOUT_FILENO, &st) != 0 || !(S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) return false;
  pollfd p{STDOUT_FILENO, 0, 0};
  return ::poll(&p, 1, 0) == 1 && (p.revents & POLLERR) != 0;
}

// Flushes standard output and reports a write error that happened at any point: exit 1 with a
// message, or quietly when the reader closed the pipe (the command's own exit code).
int finish_stdout(int code) {
  errno = 0;
  std::cout.flush();  // with stdio sync, this flushes stdout too
  int err = errno;
  bool ok = !std::cout.fail();
  errno = 0;
  if (std::fflush(stdout) != 0) {
    ok = false;
    if (errno != 0) err = errno;
  }
  if (ok && !std::ferror(stdout)) return code;
  // Quiet when the reader has gone, and after an error already reported (one line per failure).
  if (err == EPIPE || stdout_reader_gone() || code != 0) return code;
  print_error(std::string("cannot write to standard output") + (err != 0 ? std::string(": ") + std::strerror(err) : ""));
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // A closed pipe is an EPIPE write error (handled in finish_stdout), not a fatal signal.
  std::signal(SIGPIPE, SIG_IGN);
  int code = 1;
  try {
    code = run(std::vector<std::string>(argv + 1, argv + argc));
  } catch (const ddim::cli::UsageError& e) {
    print_error(e.what());
    code = 2;
  } catch (const ddim::Error& e) {
    print_error(e.what());
    code = 1;
  } catch (const std::bad_alloc&) {
    print_error("out of host memory");
    code = 1;
  } catch (const std::exception& e) {
    print_error(e.what());
    code = 1;
  } catch (...) {
    print_error("unknown exception");
    code = 1;
  }
  return finish_stdout(code);
}
