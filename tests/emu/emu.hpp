#pragma once
// The CUDA emulator as the tests see it (tests/emu, CMake option DDIM_CUDA_EMU): what it found,
// and a scope in which violations are expected (the mutation tests). See tests/emu/README.md.
#include <cstddef>
#include <string>
#include <vector>

namespace ddim_emu {

// Which check found a violation (compute-sanitizer's tool of the same purpose in brackets).
enum class Check {
  Memcheck,     // out-of-bounds or freed device memory, misused memcpy / memset ranges (memcheck)
  Initcheck,    // a kernel read device or shared memory that nothing wrote (initcheck)
  Racecheck,    // two threads touched one shared address in one barrier interval, one writing (racecheck)
  Synccheck,    // a barrier or warp collective not reached by the threads it names (synccheck)
  Schedule,     // a result that depends on the order threads or blocks run in
  StreamOrder,  // operations on different streams touch the same memory without ordering
  Capture,      // stream-capture misuse
};
const char* to_string(Check c);

struct Report {
  Check check;
  std::string text;  // the whole message: check, kernel, block, threads, addresses
};

// Violations since the last call, expected or not.
std::vector<Report> take_reports();
// How many violations were not expected (outside every ExpectViolations scope) since start.
std::size_t unexpected_violations();

// Within its lifetime violations are collected for the test instead of counting as failures.
class ExpectViolations {
 public:
  ExpectViolations();
  ~ExpectViolations();
  ExpectViolations(const ExpectViolations&) = delete;
  ExpectViolations& operator=(const ExpectViolations&) = delete;
  // The reports collected so far; true when one of them is of `check` and mentions `needle`.
  const std::vector<Report>& reports() const;
  bool has(Check check, const std::string& needle = "") const;
};

// Counters for the run's summary line.
struct Stats {
  std::size_t launches = 0, blocks = 0, threads = 0, switches = 0, grid_reruns = 0;
};
Stats stats();
std::string describe_settings();

}  // namespace ddim_emu
