// The runner of gpu_emu: the GPU test suite (tests/cuda, suite "gpu") and the emulator's own tests
// (suite "emu") on the CUDA emulator. Test cases that need cuDNN (names containing "[cudnn]")
// are skipped here, and said so: cuDNN is not emulated. The run fails when any check found a
// violation that no test expected, even if every assertion passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <chrono>
#include <cstdio>

#include "emu.hpp"

int main(int argc, char** argv) {
  doctest::Context context;
  context.addFilter("test-suite", "gpu,emu");
  context.addFilter("test-case-exclude", "*[cudnn]*");
  context.applyCommandLine(argc, argv);
  std::printf("[ddim-emu] CUDA emulator: %s\n", ddim_emu::describe_settings().c_str());
  std::printf("[ddim-emu] skipped (cuDNN is not emulated): the test cases named \"... [cudnn]\"\n");
  const auto start = std::chrono::steady_clock::now();
  int rc = context.run();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const ddim_emu::Stats s = ddim_emu::stats();
  std::printf("[ddim-emu] %zu grids (%zu reruns in other orders), %zu blocks, %zu threads, %zu fiber switches, %.1f s\n",
              s.launches, s.grid_reruns, s.blocks, s.threads, s.switches, seconds);
  const std::size_t bad = ddim_emu::unexpected_violations();
  if (bad > 0) {
    std::printf("[ddim-emu] %zu unexpected violation(s) were reported above: FAILED\n", bad);
    if (rc == 0) rc = 1;
  }
  return rc;
}
