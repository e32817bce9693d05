// Concurrency checks, built with ThreadSanitizer (tools/tsan.sh; CTest `tsan` in build-tsan/) and
// also as a plain test (CTest `concurrency`). Bounded: 8 threads, batch 2, 3 steps, 3 rounds, on
// a small model the test writes itself. What they check is what the headers promise:
//   ddim/session.hpp, ddim/ddim.h: a Model (ddim_model) and a Scheduler are immutable and may be
//   used by any number of threads at once (model reference counting included); a Session
//   (ddim_session) is used by one thread at a time, and different sessions, also of one model, may
//   run at once; a session's const queries (plan_info, model, backend, timestep_plan) may run at
//   once; ddim_last_error is per thread; the progress callback runs on the calling thread and may
//   read a flag another thread sets.
// Each concurrent result must be bitwise equal to the same work done serially.
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "ddim/ddim.h"
#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"

namespace {

constexpr int kThreads = 8;
constexpr int kBatch = 2;
constexpr int kSteps = 3;
constexpr int kRounds = 3;

std::vector<std::uint8_t> model_file() {
  ddim::graph::UNetConfig c;
  c.sample_height = 8;
  c.sample_width = 8;
  c.in_channels = 1;
  c.out_channels = 1;
  c.block_out_channels = {8, 16};
  c.down_attention = {false, true};
  c.layers_per_block = 1;
  c.norm_num_groups = 4;
  return ddim::graph::make_random_model_file(c, ddim::ScheduleConfig{}, 7);
}

std::unique_ptr<ddim::Session> session_for(const std::shared_ptr<const ddim::Model>& model, int threads) {
  ddim::SessionOptions o;
  o.backend = ddim::BackendKind::Cpu;
  o.batch = kBatch;
  o.threads = threads;
  return ddim::Session::create(model, o);
}

ddim::SampleOptions options_for(int worker, int round) {
  ddim::SampleOptions o;
  o.steps = kSteps;
  o.eta = (worker % 2) ? 0.5 : 0.0;
  o.seeds = {std::uint64_t(100 * worker + round), std::uint64_t(7 + round)};
  return o;
}

// Runs f(i) on kThreads threads at once (started together) and joins them.
template <typename F>
void run_threads(F&& f) {
  std::atomic<int> ready{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i)
    threads.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      f(i);
    });
  for (auto& t : threads) t.join();
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("sessions of one shared model sample at once, with the results of serial runs") {
  const auto bytes = model_file();
  const auto model = ddim::Model::load_from_memory(bytes, "tsan");
  // Serial reference: one session, every (worker, round) in turn.
  std::vector<std::vector<float>> expect(kThreads * kRounds);
  {
    auto s = session_for(model, 1);
    for (int w = 0; w < kThreads; ++w)
      for (int r = 0; r < kRounds; ++r) expect[w * kRounds + r] = s->sample(options_for(w, r)).images;
  }
  std::vector<std::vector<float>> got(kThreads * kRounds);
  run_threads([&](int w) {
    // Workers 0 and 1 use the session's own thread pool (2 threads) as well.
    auto s = session_for(model, w < 2 ? 2 : 1);
    for (int r = 0; r < kRounds; ++r) got[w * kRounds + r] = s->sample(options_for(w, r)).images;
  });
  for (int i = 0; i < kThreads * kRounds; ++i) {
    INFO("worker " << i / kRounds << " round " << i % kRounds);
    CHECK(same_bits(got[i], expect[i]));
  }
}

TEST_CASE("the shared Model and Scheduler are read by many threads at once") {
  const auto bytes = model_file();
  const auto model = ddim::Model::load_from_memory(bytes, "tsan");
  const ddim::Scheduler scheduler(model->schedule());
  const auto plan = scheduler.timesteps(10).timesteps;
  std::vector<float> out(64, 0.1f), x(64, 0.2f);
  std::vector<float> expect(64);
  scheduler.step(out, plan[0], plan[1], x, expect, 1, ddim::StepOptions{});
  std::atomic<int> mismatches{0};
  run_threads([&](int) {
    for (int r = 0; r < 20; ++r) {
      std::vector<float> prev(64);
      scheduler.step(out, plan[0], plan[1], x, prev, 1, ddim::StepOptions{});
      if (!same_bits(prev, expect)) mismatches.fetch_add(1);
      if (model->info().in_channels != 1 || model->summary().empty()) mismatches.fetch_add(1);
      if (scheduler.timesteps(10).timesteps != plan) mismatches.fetch_add(1);
    }
  });
  CHECK(mismatches.load() == 0);
}

TEST_CASE("const queries of one session run at once") {
  const auto bytes = model_file();
  const auto model = ddim::Model::load_from_memory(bytes, "tsan");
  auto s = session_for(model, 1);
  const ddim::Session& shared = *s;
  ddim::SampleOptions o;
  o.steps = 10;
  const auto expect = shared.timestep_plan(o).timesteps;
  std::atomic<int> mismatches{0};
  run_threads([&](int) {
    for (int r = 0; r < 20; ++r) {
      if (shared.timestep_plan(o).timesteps != expect) mismatches.fetch_add(1);
      if (shared.plan_info().batch != kBatch || shared.backend() != ddim::BackendKind::Cpu) mismatches.fetch_add(1);
      if (&shared.model() != model.get()) mismatches.fetch_add(1);
    }
  });
  CHECK(mismatches.load() == 0);
}

TEST_CASE("a flag set by another thread cancels a sample at a step boundary") {
  const auto bytes = model_file();
  const auto model = ddim::Model::load_from_memory(bytes, "tsan");
  auto s = session_for(model, 1);
  std::atomic<bool> stop{false};
  std::atomic<int> steps_seen{0};
  ddim::SampleOptions o = options_for(0, 0);
  o.steps = 200;
  o.progress = [&](int done, int) {
    steps_seen.store(done);
    return !stop.load();
  };
  std::thread canceller([&] {
    while (steps_seen.load() < 2) std::this_thread::yield();
    stop.store(true);
  });
  try {
    (void)s->sample(o);
    FAIL("the sample ran to the end despite the flag");
  } catch (const ddim::Error& e) {
    CHECK(e.code() == ddim::ErrorCode::Cancelled);
  }
  canceller.join();
  CHECK(steps_seen.load() < 200);
  // The session is usable afterwards and gives the serial result.
  auto fresh = session_for(model, 1);
  CHECK(same_bits(s->sample(options_for(3, 1)).images, fresh->sample(options_for(3, 1)).images));
}

TEST_CASE("the C API from several threads: shared model handle, one session per thread, per-thread errors") {
  const auto bytes = model_file();
  ddim_model* model = nullptr;
  REQUIRE(ddim_model_load_memory(bytes.data(), bytes.size(), &model) == DDIM_OK);
  // Serial reference through the C API.
  auto sample_c = [&](ddim_session* s, int w, int r, std::vector<float>& out) {
    std::uint64_t seeds[kBatch] = {std::uint64_t(100 * w + r), std::uint64_t(7 + r)};
    ddim_sample_options o;
    ddim_sample_options_init(&o);
    o.steps = kSteps;
    o.eta = (w % 2) ? 0.5 : 0.0;
    o.seeds = seeds;
    o.seed_count = kBatch;
    return ddim_session_sample(s, &o, out.data(), out.size());
  };
  const std::size_t count = std::size_t(kBatch) * 8 * 8;
  std::vector<std::vector<float>> expect(kThreads * kRounds, std::vector<float>(count));
  {
    ddim_session_options so;
    ddim_session_options_init(&so);
    so.backend = DDIM_BACKEND_CPU;
    so.batch = kBatch;
    so.threads = 1;
    ddim_session* s = nullptr;
    REQUIRE(ddim_session_create(model, &so, &s) == DDIM_OK);
    for (int w = 0; w < kThreads; ++w)
      for (int r = 0; r < kRounds; ++r) REQUIRE(sample_c(s, w, r, expect[w * kRounds + r]) == DDIM_OK);
    ddim_session_release(s);
  }
  std::vector<std::vector<float>> got(kThreads * kRounds, std::vector<float>(count));
  std::atomic<int> failures{0};
  run_threads([&](int w) {
    ddim_model_retain(model);  // reference counting from many threads at once
    ddim_session_options so;
    ddim_session_options_init(&so);
    so.backend = DDIM_BACKEND_CPU;
    so.batch = kBatch;
    so.threads = 1;
    ddim_session* s = nullptr;
    if (ddim_session_create(model, &so, &s) != DDIM_OK) {
      failures.fetch_add(1);
      ddim_model_release(model);
      return;
    }
    ddim_model_release(model);
    for (int r = 0; r < kRounds; ++r) {
      if (sample_c(s, w, r, got[w * kRounds + r]) != DDIM_OK) failures.fetch_add(1);
      // A per-thread error: this thread's message names its own mistake.
      ddim_sample_options bad;
      ddim_sample_options_init(&bad);
      bad.steps = 100000 + w;
      std::vector<float> out(count);
      if (ddim_session_sample(s, &bad, out.data(), out.size()) == DDIM_OK) failures.fetch_add(1);
      if (std::string(ddim_last_error()).find(std::to_string(100000 + w)) == std::string::npos) failures.fetch_add(1);
    }
    ddim_session_release(s);
  });
  CHECK(failures.load() == 0);
  for (int i = 0; i < kThreads * kRounds; ++i) {
    INFO("worker " << i / kRounds << " round " << i % kRounds);
    CHECK(same_bits(got[i], expect[i]));
  }
  ddim_model_release(model);
}
