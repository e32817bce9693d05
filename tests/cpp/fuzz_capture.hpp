#pragma once
// Seeds for the fuzz corpora (tests/fuzz): when DDIM_FUZZ_CORPUS_OUT names a folder, the
// malformed-file tests also write each input they feed a parser to DIR/<harness>/<hash>, so
// tests/fuzz/make-corpus can turn the tests' matrix of bad files into seed files. Does nothing
// otherwise.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>

namespace ddim::test {

inline void fuzz_capture(const char* harness, std::span<const std::uint8_t> bytes) {
  const char* dir = std::getenv("DDIM_FUZZ_CORPUS_OUT");
  if (dir == nullptr || *dir == '\0') return;
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a: a stable name, duplicates collapse
  for (std::uint8_t b : bytes) h = (h ^ b) * 1099511628211ull;
  const std::filesystem::path folder = std::filesystem::path(dir) / harness;
  std::filesystem::create_directories(folder);
  char name[32];
  std::snprintf(name, sizeof name, "t%016llx", static_cast<unsigned long long>(h));
  std::ofstream(folder / name, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                       static_cast<std::streamsize>(bytes.size()));
}

// A whole model file as the inputs of the model harness and of the header harness (whose input
// is the data section's size, 8 bytes little-endian, then the header JSON).
inline void fuzz_capture_file(std::span<const std::uint8_t> file) {
  fuzz_capture("model", file);
  if (file.size() < 8) return;
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | file[std::size_t(i)];
  if (n > file.size() - 8) return;
  const std::uint64_t data = file.size() - 8 - n;
  std::string input(8, '\0');
  for (int i = 0; i < 8; ++i) input[std::size_t(i)] = char((data >> (8 * i)) & 0xff);
  input.append(reinterpret_cast<const char*>(file.data() + 8), std::size_t(n));
  fuzz_capture("header", std::span<const std::uint8_t>(reinterpret_cast<const std::uint8_t*>(input.data()), input.size()));
}

}  // namespace ddim::test
