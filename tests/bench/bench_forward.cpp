// CPU forward-pass benchmark of the google/ddpm-cifar10-32 architecture (random weights):
// prints the median wall time of `iters` forwards at batch 1. Not a test: numbers only.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"

int main(int argc, char** argv) {
  const int iters = argc > 1 ? std::atoi(argv[1]) : 5;
  const int batch = argc > 2 ? std::atoi(argv[2]) : 1;
  const int threads = argc > 3 ? std::atoi(argv[3]) : 0;
  auto cfg = ddim::graph::UNetConfig::cifar10();
  auto bytes = ddim::graph::make_random_model_file(cfg, ddim::ScheduleConfig{}, 1);
  auto model = ddim::Model::load_from_memory(bytes, "cifar10-32");
  ddim::SessionOptions so;
  so.backend = ddim::BackendKind::Cpu;
  so.batch = batch;
  so.threads = threads;
  auto session = ddim::Session::create(model, so);
  std::vector<float> x(std::size_t(batch) * 3 * 32 * 32, 0.5f);
  std::vector<int> t{500};
  session->forward(x, t);  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < iters; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    session->forward(x, t);
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  std::printf("cifar10-32 forward (CPU, %s, batch %d): median %.1f ms, min %.1f ms over %d runs; %lld parameters; arena %.1f MB\n",
              session->plan_info().backend.c_str(), batch, ms[ms.size() / 2], ms[0], iters,
              static_cast<long long>(model->info().parameter_count), session->plan_info().arena_bytes / 1e6);
  return 0;
}
