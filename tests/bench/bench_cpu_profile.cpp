// Where the CPU backend's forward pass spends its time: every per-step node timed (the executor's
// node timer), grouped by op class (convolutions by shape, each with its fused epilogue and its
// implicit im2col packing; GroupNorm; attention; element-wise), median over the runs, with
// GFLOP/s against the machine's measured peak (fp32 FMA, or bf16 dot products for a bf16
// session) of one thread and of all the session's threads. Not a test: numbers only.
//
//   bench_cpu_profile [--preset cifar10-32|celebahq-256] [--batch N]... [--threads T] [--runs R]
//                     [--precision fp32|bf16]
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "cpu/cpu_backend.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu_peak.hpp"
#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"

namespace {

using ddim::graph::Node;
using ddim::graph::Op;

struct Class {
  int nodes = 0;
  double flops = 0;                 // per forward
  std::vector<double> run_seconds;  // per run
};

std::string class_of(const ddim::graph::Graph& g, const Node& n, double* flops) {
  const auto& x = g.values[n.inputs[0]];
  const auto& y = g.values[n.output];
  char buf[160];
  *flops = 0;
  switch (n.op) {
    case Op::Conv2d: {  // a fused convolution has the added value as a further input
      *flops = 2.0 * y.c * y.h * y.w * double(x.c) * n.kernel_h * n.kernel_w;
      std::snprintf(buf, sizeof buf, "conv %dx%d%s %d->%d at %dx%d", n.kernel_h, n.kernel_w, n.stride_h > 1 ? "/2" : "",
                    x.c, y.c, y.h, y.w);
      return buf;
    }
    case Op::Attention: {
      const double t = double(x.h) * x.w, c = x.c, d = n.inner_dim ? n.inner_dim : x.c;
      *flops = 2.0 * t * c * 3 * d + 2.0 * t * d * c + 4.0 * t * t * d;
      std::snprintf(buf, sizeof buf, "attention %d tokens x %d", x.h * x.w, x.c);
      return buf;
    }
    case Op::GroupNorm: return n.silu ? "group_norm + silu" : "group_norm";
    case Op::Linear: *flops = 2.0 * x.c * n.out_features; return "linear";
    default: return "elementwise (" + std::string(ddim::graph::to_string(n.op)) + ")";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "cifar10-32", precision = "fp32";
  std::vector<int> batches;
  int threads = 0, runs = 10;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench_cpu_profile: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--preset") preset = value();
    else if (a == "--batch") batches.push_back(std::atoi(value().c_str()));
    else if (a == "--threads") threads = std::atoi(value().c_str());
    else if (a == "--runs") runs = std::max(1, std::atoi(value().c_str()));
    else if (a == "--precision") precision = value();
    else {
      std::fprintf(stderr, "usage: bench_cpu_profile [--preset cifar10-32|celebahq-256] [--batch N]... [--threads T] "
                           "[--runs R] [--precision fp32|bf16]\n");
      return 2;
    }
  }
  if (batches.empty()) batches = {1, 8};
  const auto cfg = preset == "celebahq-256" ? ddim::graph::UNetConfig::celebahq256() : ddim::graph::UNetConfig::cifar10();
  auto model = ddim::Model::load_from_memory(ddim::graph::make_random_model_file(cfg, ddim::ScheduleConfig{}, 1), preset);

  for (int batch : batches) {
    ddim::SessionOptions so;
    so.backend = ddim::BackendKind::Cpu;
    so.batch = batch;
    so.threads = threads;
    so.precision = ddim::parse_precision(precision);
    ddim::ExecutorContext ctx{model, model->info().height, model->info().width};
    ddim::cpu::CpuExecutor ex(ctx, so);
    const int pool_threads = ex.threads();
    const auto& g = ex.step_graph();
    std::map<std::string, Class> classes;
    std::vector<double> totals;
    std::map<std::string, double> current;
    ex.set_node_timer([&](const Node& n, double s) {
      double f;
      current[class_of(g, n, &f)] += s;
    });
    const std::size_t in = std::size_t(batch) * 3 * model->info().height * model->info().width;
    std::vector<float> x(in, 0.5f), out(std::size_t(batch) * model->info().out_channels * model->info().height *
                                        model->info().width);
    std::vector<int> t(std::size_t(batch), 500);
    ex.forward(x, t, out);  // warm-up
    const ddim::graph::TimeFolding step_fold = ddim::graph::fold_time_only(g);
    for (int i : step_fold.step_nodes) {
      const Node& n = g.nodes[std::size_t(i)];
      double f;
      Class& c = classes[class_of(g, n, &f)];
      ++c.nodes;
      c.flops += f * batch;
    }
    for (int r = 0; r < runs; ++r) {
      current.clear();
      const auto t0 = std::chrono::steady_clock::now();
      ex.forward(x, t, out);
      totals.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      for (auto& [name, c] : classes) c.run_seconds.push_back(current[name]);
    }
    auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    // bf16 sessions against the bf16 dot-product peak (vdpbf16ps), fp32 ones against the FMA peak.
    const bool bf16 = ex.plan_info().precision == "bf16";
    const auto kind = bf16 ? ddim::bench::PeakKind::Bf16Dot : ddim::bench::PeakKind::Fp32Fma;
    const double peak1 = ddim::bench::measured_peak_gflops(1, kind);
    const double peakn = ddim::bench::measured_peak_gflops(pool_threads, kind);
    const double total = median(totals);
    std::printf("\n%s forward, batch %d, %s, %d threads, median of %d runs: %.1f ms (%.1f GFLOP, %.0f GFLOP/s)\n",
                preset.c_str(), batch, ex.plan_info().precision.c_str(), pool_threads, runs, total * 1e3,
                ex.plan_info().forward_flops * 1e-9, ex.plan_info().forward_flops / total * 1e-9);
    std::printf("measured %s peak: %.0f GFLOP/s (1 thread), %.0f GFLOP/s (%d threads)\n",
                bf16 ? "bf16 dot-product" : "fp32 FMA", peak1, peakn, pool_threads);
    std::printf("| op class | nodes | ms | %% of forward | GFLOP | GFLOP/s | %% of 1-thread peak | %% of %d-thread peak |\n",
                pool_threads);
    std::printf("|---|---|---|---|---|---|---|---|\n");
    std::vector<std::pair<double, std::string>> order;
    for (const auto& [name, c] : classes) order.push_back({median(c.run_seconds), name});
    std::sort(order.rbegin(), order.rend());
    double sum = 0;
    for (const auto& [s, name] : order) {
      const Class& c = classes[name];
      sum += s;
      if (c.flops > 0)
        std::printf("| %s | %d | %.2f | %.1f | %.2f | %.0f | %.0f | %.0f |\n", name.c_str(), c.nodes, s * 1e3,
                    100 * s / total, c.flops * 1e-9, c.flops / s * 1e-9, 100 * c.flops / s * 1e-9 / peak1,
                    100 * c.flops / s * 1e-9 / peakn);
      else
        std::printf("| %s | %d | %.2f | %.1f | | | | |\n", name.c_str(), c.nodes, s * 1e3, 100 * s / total);
    }
    std::printf("| (outside the nodes: table rows, copies) | | %.2f | %.1f | | | | |\n", (total - sum) * 1e3,
                100 * (total - sum) / total);
  }
  return 0;
}
