// Per-call overhead of the C API (ddim/ddim.h) over the C++ call it wraps, on near-empty calls:
// one DDIM step of the model-free scheduler on 16 floats, and a session's timestep plan (50
// steps, the bundled model's schedule; no sampling). Prints the median time per call of each and
// their difference. Not a test: timings depend on the machine and its load.
//   bench_api_overhead [MODEL]   (default weights/default.ddim)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "ddim/ddim.h"
#include "ddim/ddim.hpp"

namespace {

// Median over rounds of the mean time per call (ns) of `calls` calls of f.
double ns_per_call(const std::function<void()>& f, int calls, int rounds = 15) {
  for (int i = 0; i < calls / 10; ++i) f();  // warm up
  std::vector<double> t;
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) f();
    t.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() / calls);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void row(const char* what, double cpp, double c) {
  std::printf("%-44s  C++ %9.1f ns   C %9.1f ns   C - C++ %+8.1f ns\n", what, cpp, c, c - cpp);
}

}  // namespace

int main(int argc, char** argv) {
  const char* path = argc > 1 ? argv[1] : "weights/default.ddim";
  try {
    // ---- one scheduler step on 16 floats
    ddim::Scheduler scheduler{ddim::ScheduleConfig{}};
    std::vector<float> out(16, 0.1f), x(16, 0.2f), prev(16);
    const ddim::StepOptions so;
    const double cpp_step = ns_per_call([&] { scheduler.step(out, 500, 250, x, prev, 1, so); }, 200000);

    ddim_schedule sched;
    ddim_schedule_init(&sched);
    ddim_scheduler* cs = nullptr;
    if (ddim_scheduler_create(&sched, &cs) != DDIM_OK) throw std::runtime_error(ddim_last_error());
    ddim_step_options cso;
    ddim_step_options_init(&cso);
    const double c_step = ns_per_call(
        [&] { (void)ddim_scheduler_step(cs, out.data(), 500, 250, x.data(), prev.data(), 1, 16, &cso, nullptr, nullptr); },
        200000);
    ddim_scheduler_release(cs);

    // ---- a session's timestep plan (no sampling)
    auto model = ddim::Model::load(path);
    ddim::SessionOptions opt;
    opt.backend = ddim::BackendKind::Cpu;
    auto session = ddim::Session::create(model, opt);
    ddim::SampleOptions o;
    o.steps = 50;
    const double cpp_plan = ns_per_call([&] { (void)session->timestep_plan(o); }, 5000);

    ddim_model* cm = nullptr;
    ddim_session* csess = nullptr;
    if (ddim_model_load(path, &cm) != DDIM_OK) throw std::runtime_error(ddim_last_error());
    ddim_session_options cso2;
    ddim_session_options_init(&cso2);
    cso2.backend = DDIM_BACKEND_CPU;
    if (ddim_session_create(cm, &cso2, &csess) != DDIM_OK) throw std::runtime_error(ddim_last_error());
    ddim_model_release(cm);
    ddim_sample_options co;
    ddim_sample_options_init(&co);
    co.steps = 50;
    int ts[64];
    std::size_t count = 0;
    const double c_plan = ns_per_call([&] { (void)ddim_session_timesteps(csess, &co, ts, 64, &count); }, 5000);
    // ---- the cheapest session call
    int n = 0;
    const double c_shape = ns_per_call([&] { (void)ddim_session_get_shape(csess, &n, nullptr, nullptr, nullptr, nullptr); }, 200000);
    const double cpp_shape = ns_per_call([&] { n = session->plan_info().batch; }, 200000);
    ddim_session_release(csess);

    std::printf("C API overhead per call (median of 15 rounds):\n");
    row("scheduler step, 16 floats", cpp_step, c_step);
    row("session timestep plan, 50 steps", cpp_plan, c_plan);
    row("session shape (get_shape / plan_info)", cpp_shape, c_shape);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_api_overhead: %s\n", e.what());
    return 1;
  }
  return 0;
}
