#pragma once
// Helpers for the tests that use the `ddim` tool as a hostile user would (test_cli_hostile.cpp,
// test_reliability.cpp): shell command lines (FIFOs, ulimit, signals), raw files, directory scans.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <vector>

#include "format/container.hpp"
#include "npy.hpp"
#include "test_util.hpp"

namespace ddim::test {

// The tool's path, quoted for sh.
inline std::string ddim_cli() { return std::string("'") + DDIM_CLI_PATH + "'"; }

// Runs a shell command line (sh -c) with stderr joined to stdout.
inline CliRun run_sh(const std::string& script) {
  const std::string cmd = "{ " + script + "\n} 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  while (std::size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

inline void write_bytes(const std::filesystem::path& path, std::span<const std::uint8_t> bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  REQUIRE(f.good());
}

inline void write_text(const std::filesystem::path& path, const std::string& text) {
  write_bytes(path, std::span(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()));
}

inline std::string read_text(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// A float32 .npy written directly (not through the tool's atomic writer).
inline void write_npy(const std::filesystem::path& path, std::vector<std::int64_t> shape, const std::vector<float>& data) {
  write_bytes(path, tools::encode_npy_f32(shape, data));
}

inline std::size_t count_lines(const std::string& s) {
  std::size_t n = 0;
  for (char c : s) n += c == '\n';
  return n + (!s.empty() && s.back() != '\n');
}

// No temporary file of the tool's writer (".ddim-*.tmp") left in dir (recursively).
inline bool no_temp_files(const std::filesystem::path& dir) {
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(".ddim-", 0) == 0 || name.find(".tmp") != std::string::npos) return false;
  }
  return true;
}

// The tiny test model (3 x 16 x 12 samples) as a file in dir.
inline std::string tiny_model_file(const TempDir& dir, ScheduleConfig schedule = {}, const std::string& name = "tiny.ddim") {
  const std::string path = dir / name;
  format::write_file(path, graph::make_random_model_file(tiny_unet(), schedule, 4));
  return path;
}

}  // namespace ddim::test
