// The test runner. GPU test cases (test suite "gpu", tests/cuda/) need a CUDA device: without one
// they are excluded and the runner says how many; asked for explicitly (--test-suite=gpu) on a
// machine without a device it exits with 77, which CTest reports as skipped (SKIP_RETURN_CODE).
// Likewise --skip-without-cpu-isa (the CTest tests cpu_isa_<level>): when DDIM_CPU_ISA names an
// instruction-set level this CPU lacks, exit with 77 instead of running.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

#include <string>

#include "cpu/isa.hpp"
#include "ddim/session.hpp"

int main(int argc, char** argv) {
  bool gpu_only = false, isa_check = false;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--test-suite=gpu") == 0 || std::strcmp(argv[i], "-ts=gpu") == 0) gpu_only = true;
    if (std::strcmp(argv[i], "--skip-without-cpu-isa") == 0) {
      isa_check = true;
      continue;  // ours, not doctest's
    }
    args.push_back(argv[i]);
  }
  if (const char* isa = std::getenv("DDIM_CPU_ISA"); isa_check && isa && *isa && std::string(isa) != "auto") {
    std::string missing;
    try {
      if (!ddim::cpu::isa_supported(ddim::cpu::parse_isa(isa), &missing)) {
        std::printf("SKIPPED: DDIM_CPU_ISA=%s: this CPU lacks %s\n", isa, missing.c_str());
        return 77;
      }
    } catch (const std::exception& e) {
      std::printf("%s\n", e.what());
      return 2;
    }
  }
  const int devices = ddim::cuda_device_count();
  if (gpu_only && devices == 0) {
    std::printf("SKIPPED: the GPU tests need a CUDA device; this machine (or build) has none\n");
    return 77;
  }
  doctest::Context context;
  context.applyCommandLine(static_cast<int>(args.size()), args.data());
  if (devices == 0) {
    context.addFilter("test-suite-exclude", "gpu");
    std::fprintf(stderr, "[ddim] no CUDA device: GPU test cases (suite \"gpu\") are skipped, not run\n");
  }
  return context.run();
}
