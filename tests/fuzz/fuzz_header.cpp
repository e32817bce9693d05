// fuzz_header: the strict JSON reader (parse_json_strict: UTF-8, duplicate keys at any depth) and
// the safetensors-style header validation (parse_header: tensor entries, dtypes, shapes, offsets
// against the file size). The input's first 8 bytes give the file size the header is checked
// against (little-endian, modulo 2^40); the rest is the header JSON.
#include <string_view>

#include <nlohmann/json.hpp>

#include "format/container.hpp"
#include "fuzz_common.hpp"

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  if (data.size() < 8) return 0;
  std::uint64_t file_size = 0;
  for (int i = 7; i >= 0; --i) file_size = (file_size << 8) | data[std::size_t(i)];
  file_size &= (std::uint64_t(1) << 40) - 1;
  const auto json = data.subspan(8);
  const std::string_view text(reinterpret_cast<const char*>(json.data()), json.size());
  expect_only_ddim_errors("fuzz_header", [&] { (void)ddim::format::parse_json_strict(text, "fuzz header"); });
  expect_only_ddim_errors("fuzz_header", [&] {
    (void)ddim::format::read_header_length(data.first(8), file_size + 8 + json.size());
  });
  expect_only_ddim_errors("fuzz_header", [&] { (void)ddim::format::parse_header(json, file_size + 8 + json.size()); });
  return 0;
}
