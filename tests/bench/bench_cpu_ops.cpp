// Microbenchmark of the CPU backend's heaviest kernels: gemm at 256 x 1024 x 1152 (a 3x3 conv of
// 128 channels at 32x32, as a matrix product) and conv2d 3x3 128->128 at 32x32, batch 1.
// Prints GFLOP/s (median of several runs) for a pool of 1 thread and of every hardware thread.
// Not a test: timings depend on the machine and its load.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"

using namespace ddim::cpu;

namespace {

std::vector<float> random_vec(std::size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  std::uint32_t s = seed * 2654435761u + 1u;
  for (float& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>(s >> 8) * (2.0f / 16777216.0f) - 1.0f;
  }
  return v;
}

struct Timing {
  double median, min;  // seconds
};

// Median and fastest of `runs` timed calls after two warm-up calls. On a shared machine the
// minimum shows what the code can do; the median what it did.
Timing time_runs(const std::function<void()>& fn, int runs) {
  fn();
  fn();
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return Timing{t[t.size() / 2], t.front()};
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = argc > 1 ? std::max(1, std::atoi(argv[1])) : 21;
  const int hw_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("gemm kernel: %s, %d hardware threads, median of %d runs\n", gemm_kernel_name(), hw_threads, runs);

  const int M = 256, N = 1024, K = 1152;
  const auto A = random_vec(static_cast<std::size_t>(M) * K, 1);
  const auto B = random_vec(static_cast<std::size_t>(K) * N, 2);
  std::vector<float> C(static_cast<std::size_t>(M) * N);

  const Conv2dShape s{1, 128, 32, 32, 128, 3, 3, 1, 1, 1, 1, 1, 1};
  const auto x = random_vec(static_cast<std::size_t>(s.cin) * s.h * s.w, 3);
  const auto w = random_vec(static_cast<std::size_t>(s.cout) * s.cin * 9, 4);
  const auto bias = random_vec(static_cast<std::size_t>(s.cout), 5);
  std::vector<float> y(static_cast<std::size_t>(s.cout) * s.out_h() * s.out_w());

  std::vector<int> thread_counts = {1};
  if (hw_threads > 1) thread_counts.push_back(hw_threads);
  for (int threads : thread_counts) {
    ThreadPool pool(threads);
    const double gemm_flops = 2.0 * M * N * K;
    const Timing tg = time_runs([&] { gemm(M, N, K, A.data(), K, B.data(), N, C.data(), N, false, &pool); }, runs);
    const double conv_flops = 2.0 * s.cout * s.out_h() * s.out_w() * s.cin * 9;
    const Timing tc =
        time_runs([&] { conv2d(s, x.data(), w.data(), bias.data(), y.data(), &pool); }, runs);
    std::printf(
        "threads %d: gemm 256x1024x1152: %7.3f ms, %6.1f GFLOP/s (best %6.1f) | "
        "conv2d 3x3 128->128 32x32: %7.3f ms, %6.1f GFLOP/s (best %6.1f)\n",
        threads, tg.median * 1e3, gemm_flops / tg.median * 1e-9, gemm_flops / tg.min * 1e-9, tc.median * 1e3,
        conv_flops / tc.median * 1e-9, conv_flops / tc.min * 1e-9);
  }
  return 0;
}
