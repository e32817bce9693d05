// The test runner. GPU test cases (test suite "gpu", tests/cuda/) need a CUDA device: without one
// they are excluded and the runner says how many; asked for explicitly (--test-suite=gpu) on a
// machine without a device it exits with 77, which CTest reports as skipped (SKIP_RETURN_CODE).
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstring>

#include "ddim/session.hpp"

int main(int argc, char** argv) {
  bool gpu_only = false;
  for (int i = 1; i < argc; ++i)
    if (std::strcmp(argv[i], "--test-suite=gpu") == 0 || std::strcmp(argv[i], "-ts=gpu") == 0) gpu_only = true;
  const int devices = ddim::cuda_device_count();
  if (gpu_only && devices == 0) {
    std::printf("SKIPPED: the GPU tests need a CUDA device; this machine (or build) has none\n");
    return 77;
  }
  doctest::Context context;
  context.applyCommandLine(argc, argv);
  if (devices == 0) {
    context.addFilter("test-suite-exclude", "gpu");
    std::fprintf(stderr, "[ddim] no CUDA device: GPU test cases (suite \"gpu\") are skipped, not run\n");
  }
  return context.run();
}
