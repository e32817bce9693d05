// The engine's side of tools/bench-cpu: plans one CPU session and times single forwards on
// request, so that a driver can interleave them with another contender's. Not a test.
//
//   bench_cpu_worker --model FILE --batch N --precision fp32|bf16 --threads T
//
// Prints one line `ready <json>` (backend, precision, forward GFLOP, the measured fp32 FMA and
// bf16 dot-product peaks of 1 and of T threads), then answers each line read from stdin:
//   run   -> the wall time of one forward, in ms
//   quit  -> exits
// Errors go to stderr with exit status 1.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "cpu_peak.hpp"
#include "ddim/ddim.hpp"

int main(int argc, char** argv) {
  std::string model_path, precision = "fp32";
  int batch = 1, threads = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i], v = argv[i + 1];
    if (a == "--model") model_path = v;
    else if (a == "--batch") batch = std::atoi(v.c_str());
    else if (a == "--precision") precision = v;
    else if (a == "--threads") threads = std::atoi(v.c_str());
    else {
      std::fprintf(stderr, "bench_cpu_worker: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  try {
    auto model = ddim::Model::load(model_path);
    ddim::SessionOptions so;
    so.backend = ddim::BackendKind::Cpu;
    so.batch = batch;
    so.threads = threads;
    so.precision = ddim::parse_precision(precision);
    auto session = ddim::Session::create(model, so);
    const auto& info = model->info();
    std::vector<float> x(std::size_t(batch) * info.in_channels * info.height * info.width);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(((i * 2654435761u) >> 8) % 2001) / 1000.0f - 1.0f;
    const std::vector<int> t{500};
    session->forward(x, t);  // warm-up: the time tables, the packing buffers
    const int pool = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    const ddim::PlanInfo& p = session->plan_info();
    std::printf("ready {\"backend\": \"%s\", \"precision\": \"%s\", \"batch\": %d, \"forward_gflop\": %.4f, "
                "\"peak_fp32_1\": %.1f, \"peak_fp32_n\": %.1f, \"peak_bf16_1\": %.1f, \"peak_bf16_n\": %.1f}\n",
                p.backend.c_str(), p.precision.c_str(), batch, p.forward_flops * 1e-9,
                ddim::bench::measured_peak_gflops(1), ddim::bench::measured_peak_gflops(pool),
                ddim::bench::measured_peak_gflops(1, ddim::bench::PeakKind::Bf16Dot),
                ddim::bench::measured_peak_gflops(pool, ddim::bench::PeakKind::Bf16Dot));
    std::fflush(stdout);
    std::string line;
    while (std::getline(std::cin, line)) {
      if (line == "quit") break;
      if (line != "run") {
        std::fprintf(stderr, "bench_cpu_worker: unknown request '%s'\n", line.c_str());
        return 1;
      }
      const auto t0 = std::chrono::steady_clock::now();
      session->forward(x, t);
      std::printf("%.4f\n", std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cpu_worker: %s\n", e.what());
    return 1;
  }
  return 0;
}
