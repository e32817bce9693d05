// Violation reports, the emulator's settings, and the test-facing API of emu.hpp.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "internal.hpp"

namespace ddim_emu {

namespace {

struct Reports {
  std::vector<Report> all;       // since the last take_reports
  std::vector<Report> expected;  // collected by the innermost ExpectViolations
  int expect_depth = 0;
  std::size_t unexpected = 0;
};

Reports& reps() {
  static Reports* r = new Reports();
  return *r;
}

std::size_t env_size(const char* name, std::size_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 10);
  return end && *end == '\0' ? std::size_t(x) : fallback;
}

}  // namespace

Settings& settings() {
  static Settings* s = [] {
    auto* p = new Settings();
    // DDIM_EMU_SCHEDULES: 1 (forward only), 2 (forward, then reverse or random; the default),
    // 3 (forward, reverse and random).
    const std::size_t runs = env_size("DDIM_EMU_SCHEDULES", 2);
    p->compare_schedules = runs >= 2;
    p->all_schedules = runs >= 3;
    p->seed = env_size("DDIM_EMU_SEED", 1);
    // DDIM_EMU_COMPARE_REPEATS: how many runs of each kernel with each launch configuration are
    // compared in two orders (default 2; 0: every run).
    const std::size_t repeats = env_size("DDIM_EMU_COMPARE_REPEATS", 2);
    p->compare_repeats = repeats == 0 ? 1 << 30 : int(repeats);
    p->device_memory = env_size("DDIM_EMU_DEVICE_MEMORY_MIB", 8192) << 20;
    return p;
  }();
  return *s;
}

std::string describe_settings() {
  const Settings& s = settings();
  return std::string("schedules: ") +
         (s.all_schedules ? "forward, reverse and random" : s.compare_schedules ? "forward, then reverse or random (alternating)" : "forward only") +
         (s.compare_schedules ? ", for the first " + std::to_string(s.compare_repeats) + " runs of each kernel and launch configuration" : "") +
         "; seed " + std::to_string(s.seed) + "; device memory " + std::to_string(s.device_memory >> 20) + " MiB";
}

const char* to_string(Check c) {
  switch (c) {
    case Check::Memcheck: return "memcheck";
    case Check::Initcheck: return "initcheck";
    case Check::Racecheck: return "racecheck";
    case Check::Synccheck: return "synccheck";
    case Check::Schedule: return "schedule";
    case Check::StreamOrder: return "stream-order";
    case Check::Capture: return "capture";
  }
  return "?";
}

void report(Check check, const std::string& message, cudaError_t async_error) {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  const std::string text = std::string("[") + to_string(check) + "] " + context_text() + ": " + message;
  fail_current_op(async_error);
  if (!should_report(check, text)) return;
  Reports& r = reps();
  r.all.push_back(Report{check, text});
  if (r.expect_depth > 0) {
    r.expected.push_back(Report{check, text});
    return;
  }
  ++r.unexpected;
  std::fprintf(stderr, "[ddim-emu] %s\n", text.c_str());
  std::fflush(stderr);
}

std::vector<Report> take_reports() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  std::vector<Report> out;
  out.swap(reps().all);
  return out;
}

std::size_t unexpected_violations() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  return reps().unexpected;
}

ExpectViolations::ExpectViolations() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  if (reps().expect_depth++ == 0) reps().expected.clear();
}

ExpectViolations::~ExpectViolations() {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  --reps().expect_depth;
}

const std::vector<Report>& ExpectViolations::reports() const { return reps().expected; }

bool ExpectViolations::has(Check check, const std::string& needle) const {
  std::lock_guard<std::recursive_mutex> lock(device_mutex());
  for (const Report& r : reps().expected)
    if (r.check == check && r.text.find(needle) != std::string::npos) return true;
  return false;
}

}  // namespace ddim_emu
