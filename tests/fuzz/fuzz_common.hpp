#pragma once
// Shared by the fuzz harnesses (tests/fuzz/fuzz_*.cpp). A harness feeds its bytes to one parser and
// accepts exactly one way to fail: ddim::Error (or the tool's UsageError), the documented error of
// every parser. Anything else that escapes (std::out_of_range, nlohmann::json's exceptions,
// std::length_error ...) is a bug: the harness traps, so libFuzzer and the replay test report it.
// Crashes, leaks and undefined behaviour are found by the sanitizers of the fuzz build
// (-DDDIM_FUZZ=ON: AddressSanitizer, UndefinedBehaviorSanitizer, LeakSanitizer).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <span>
#include <string_view>

#include "ddim/error.hpp"

namespace ddim::fuzz {

// The harness's body: called once per input.
int run_one(std::span<const std::uint8_t> data);

// Runs f(); a ddim::Error is the expected rejection of a bad input; anything else traps.
template <typename F>
void expect_only_ddim_errors(std::string_view harness, F&& f) {
  try {
    f();
  } catch (const ddim::Error&) {
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%.*s: an exception other than ddim::Error escaped: %s\n", int(harness.size()), harness.data(),
                 e.what());
    __builtin_trap();
  }
}

}  // namespace ddim::fuzz

// The libFuzzer entry point (and the replay driver's, replay_main.cpp).
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return ddim::fuzz::run_one(std::span<const std::uint8_t>(data, size));
}
