// GPU benchmark of one model file (tools/bench runs it per preset): prints one JSON object with
//   cold_start_ms          file -> first 50-step image at batch 1, in a fresh process (includes
//                          CUDA context creation, the weight upload, planning and graph capture)
//   session_ms             Session::create of that first session (upload, cuDNN planning, warm-up)
//   second_session_ms      Session::create of a second batch-1 session: {"shared_plans": with the
//                          process-wide cuDNN plan cache (nothing to plan), "private_plans": with
//                          DDIM_CUDNN_PLAN_CACHE=0 (every convolution planned again)}
//   forward_ms             Session::forward at batch 1 (host tables, copies in and out), median
//   sample50_ms[batch]     a 50-step sample, median over runs (batch 1 and the throughput batches)
//   images_per_s[batch]    batch / sample50 time
//   tflops[batch]          forward FLOPs (unpadded, graph/passes.hpp) x 50 / sample50 time
//   peak_mib[batch]        peak device memory of this process during that configuration, from
//                          NVML's per-process accounting (the same figure nvidia-smi shows), the
//                          way tools/bench_torch.py measures PyTorch
//   sample50_ms_batch1_whole_loop_graph
//                          the same 50-step sample at batch 1 with all steps in one CUDA graph
//   gemm_fp16_tflops       a dense 8192^3 fp16 GEMM with fp32 accumulation (cuBLAS), best of 10:
//                          the reference for the effective FLOP rate
// Numbers only: nothing is asserted.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "ddim/ddim.hpp"

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

// NVML through dlopen (the driver ships libnvidia-ml.so.1; no build dependency).
class ProcessMemory {
 public:
  explicit ProcessMemory(int cuda_device) {
    lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!lib_) return;
    auto init = reinterpret_cast<int (*)()>(dlsym(lib_, "nvmlInit_v2"));
    auto by_bus = reinterpret_cast<int (*)(const char*, void**)>(dlsym(lib_, "nvmlDeviceGetHandleByPciBusId_v2"));
    query_ = reinterpret_cast<int (*)(void*, unsigned*, Info*)>(dlsym(lib_, "nvmlDeviceGetComputeRunningProcesses_v3"));
    char bus[64] = {0};
    if (!init || !by_bus || !query_ || init() != 0 || cudaDeviceGetPCIBusId(bus, sizeof bus, cuda_device) != cudaSuccess ||
        by_bus(bus, &device_) != 0)
      query_ = nullptr;
  }
  bool available() const { return query_ != nullptr; }
  // This process's device memory in bytes (0 when unknown).
  unsigned long long now() const {
    if (!query_) return 0;
    Info infos[64];
    unsigned count = 64;
    if (query_(device_, &count, infos) != 0) return 0;
    for (unsigned i = 0; i < count; ++i)
      if (infos[i].pid == unsigned(getpid())) return infos[i].used;
    return 0;
  }

 private:
  struct Info {
    unsigned pid;
    unsigned long long used;
    unsigned gpu_instance, compute_instance;
  };
  void* lib_ = nullptr;
  void* device_ = nullptr;
  int (*query_)(void*, unsigned*, Info*) = nullptr;
};

// Samples ProcessMemory every 2 ms on a thread; peak() since the last reset.
class PeakWatcher {
 public:
  explicit PeakWatcher(const ProcessMemory& m) : m_(m), thread_([this] {
    while (!stop_) {
      const unsigned long long v = m_.now();
      unsigned long long cur = peak_.load();
      while (v > cur && !peak_.compare_exchange_weak(cur, v)) {
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }) {}
  ~PeakWatcher() {
    stop_ = true;
    thread_.join();
  }
  void reset() { peak_ = m_.now(); }
  double peak_mib() const { return double(peak_.load()) / (1 << 20); }

 private:
  const ProcessMemory& m_;
  std::atomic<bool> stop_{false};
  std::atomic<unsigned long long> peak_{0};
  std::thread thread_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double gemm_fp16_tflops() {
  const int n = 8192;
  void *a = nullptr, *b = nullptr, *c = nullptr;
  if (cudaMalloc(&a, std::size_t(n) * n * 2) || cudaMalloc(&b, std::size_t(n) * n * 2) || cudaMalloc(&c, std::size_t(n) * n * 2))
    return 0;
  {
    // Random operands in [-1, 1): zeros would toggle fewer bits, draw less power and overstate
    // the sustained rate.
    std::vector<__half> host(std::size_t(n) * n);
    std::uint32_t state = 12345;
    for (auto& h : host) {
      state = state * 1664525u + 1013904223u;
      h = __float2half_rn(float(state >> 8) * 0x1p-23f - 1.f);
    }
    cudaMemcpy(a, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(b, host.data(), host.size() * 2, cudaMemcpyHostToDevice);
  }
  cublasHandle_t h;
  cublasCreate(&h);
  const float alpha = 1, beta = 0;
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  double best = 1e30;
  for (int i = 0; i < 12; ++i) {
    cudaEventRecord(e0);
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16F, n, b, CUDA_R_16F, n, &beta, c, CUDA_R_16F, n,
                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0;
    cudaEventElapsedTime(&ms, e0, e1);
    if (i >= 2) best = std::min(best, double(ms));
  }
  cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  return 2.0 * n * n * double(n) / (best * 1e-3) / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_gpu MODEL.ddim fp16|bf16|fp32 [BATCH...] [--runs N]\n");
    return 2;
  }
  try {
    const std::string path = argv[1];
    const ddim::Precision precision = ddim::parse_precision(argv[2]);
    std::vector<int> batches;
    int runs = 10;
    for (int i = 3; i < argc; ++i) {
      if (std::strcmp(argv[i], "--runs") == 0 && i + 1 < argc) runs = std::atoi(argv[++i]);
      else batches.push_back(std::atoi(argv[i]));
    }
    ddim::SampleOptions so;
    so.steps = 50;
    so.seed = 0;

    // Cold start first, before anything touches the device.
    const auto t0 = Clock::now();
    auto model = ddim::Model::load(path);
    ddim::SessionOptions o;
    o.backend = ddim::BackendKind::Cuda;
    o.precision = precision;
    o.batch = 1;
    const auto t1 = Clock::now();
    auto session = ddim::Session::create(model, o);
    const double first_session = ms_since(t1);
    session->sample(so);
    const double cold = ms_since(t0);
    double second_shared = 0, second_private = 0;
    {
      const auto s0 = Clock::now();
      auto second = ddim::Session::create(model, o);
      second_shared = ms_since(s0);
      setenv("DDIM_CUDNN_PLAN_CACHE", "0", 1);
      const auto s1 = Clock::now();
      auto own = ddim::Session::create(model, o);
      second_private = ms_since(s1);
      unsetenv("DDIM_CUDNN_PLAN_CACHE");
    }

    ProcessMemory mem(0);
    PeakWatcher watch(mem);
    std::map<int, double> sample_ms, peak;
    double forward_ms = 0, flops1 = session->plan_info().forward_flops;
    {
      const std::size_t E = std::size_t(model->info().in_channels) * model->info().height * model->info().width;
      std::vector<float> x(E, 0.1f);
      std::vector<int> t{500};
      session->forward(x, t);
      std::vector<double> v;
      for (int i = 0; i < 20; ++i) {
        const auto s0 = Clock::now();
        session->forward(x, t);
        v.push_back(ms_since(s0));
      }
      forward_ms = median(v);
    }
    session.reset();
    std::map<int, double> flops;
    batches.insert(batches.begin(), 1);
    for (int b : batches) {
      watch.reset();
      o.batch = b;
      auto s = ddim::Session::create(model, o);
      s->sample(so);  // warm-up: capture
      std::vector<double> v;
      for (int i = 0; i < std::max(3, b > 16 ? runs / 3 : runs); ++i) {
        const auto s0 = Clock::now();
        s->sample(so);
        v.push_back(ms_since(s0));
      }
      sample_ms[b] = median(v);
      flops[b] = s->plan_info().forward_flops;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      peak[b] = watch.peak_mib();
    }
    // The whole loop as one graph (SessionOptions::whole_loop_graph), batch 1.
    double loop_ms = 0;
    {
      o.batch = 1;
      o.whole_loop_graph = true;
      auto s = ddim::Session::create(model, o);
      s->sample(so);
      std::vector<double> v;
      for (int i = 0; i < runs; ++i) {
        const auto s0 = Clock::now();
        s->sample(so);
        v.push_back(ms_since(s0));
      }
      loop_ms = median(v);
      o.whole_loop_graph = false;
    }
    const double gemm = gemm_fp16_tflops();
    cudaDeviceProp prop{};
    cudaGetDeviceProperties(&prop, 0);
    int driver = 0, runtime = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    std::printf("{\"model\": \"%s\", \"precision\": \"%s\", \"gpu\": \"%s\", \"driver\": %d, \"cuda_runtime\": %d,\n", path.c_str(),
                argv[2], prop.name, driver, runtime);
    std::printf(" \"parameters\": %lld, \"forward_gflop_batch1\": %.3f, \"cold_start_ms\": %.1f, \"forward_ms\": %.3f,\n",
                static_cast<long long>(model->info().parameter_count), flops1 / 1e9, cold, forward_ms);
    std::printf(" \"session_ms\": %.1f, \"second_session_ms\": {\"shared_plans\": %.1f, \"private_plans\": %.1f},\n",
                first_session, second_shared, second_private);
    std::printf(" \"gemm_fp16_tflops\": %.1f, \"nvml\": %s, \"sample50_ms_batch1_whole_loop_graph\": %.3f,\n", gemm,
                mem.available() ? "true" : "false", loop_ms);
    std::printf(" \"runs\": [");
    bool first = true;
    for (int b : batches) {
      const double s = sample_ms[b] / 1e3;
      std::printf("%s\n  {\"batch\": %d, \"sample50_ms\": %.3f, \"images_per_s\": %.1f, \"tflops\": %.2f, \"peak_mib\": %.0f}",
                  first ? "" : ",", b, sample_ms[b], b / s, flops[b] * 50 / s / 1e12, peak[b]);
      first = false;
    }
    std::printf("]}\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_gpu: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
