// Uses only the installed public headers: the schedule and a bad model file.
#include <cstdio>
#include <vector>

#include <ddim/ddim.hpp>

int main() {
  ddim::Scheduler scheduler{ddim::ScheduleConfig{}};
  auto plan = scheduler.timesteps(10, ddim::Spacing::Trailing);
  if (plan.timesteps.size() != 10 || plan.timesteps.front() != 999 || plan.timesteps.back() != 99) {
    std::fprintf(stderr, "consumer: unexpected timesteps\n");
    return 1;
  }
  std::vector<std::uint8_t> junk(16, 0xff);
  try {
    ddim::Model::load_from_memory(junk, "junk");
    std::fprintf(stderr, "consumer: a junk model file was accepted\n");
    return 1;
  } catch (const ddim::Error& e) {
    if (e.code() != ddim::ErrorCode::InvalidFile) return 1;
  }
  std::printf("consumer ok: %d timesteps, %d CUDA devices\n", int(plan.timesteps.size()), ddim::cuda_device_count());
  return 0;
}
