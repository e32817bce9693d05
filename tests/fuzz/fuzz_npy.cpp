// fuzz_npy: the ddim tool's .npy readers: the header (magic, version, the header dict as a
// Python literal, dtype, order, shape arithmetic, data size), float32 arrays and timestep vectors.
#include "fuzz_common.hpp"
#include "npy.hpp"

int ddim::fuzz::run_one(std::span<const std::uint8_t> data) {
  expect_only_ddim_errors("fuzz_npy", [&] { (void)ddim::tools::parse_npy_header(data, data.size(), "fuzz.npy"); });
  expect_only_ddim_errors("fuzz_npy", [&] { (void)ddim::tools::parse_npy_f32(data, "fuzz.npy"); });
  expect_only_ddim_errors("fuzz_npy", [&] { (void)ddim::tools::parse_npy_timesteps(data, "fuzz.npy"); });
  return 0;
}
