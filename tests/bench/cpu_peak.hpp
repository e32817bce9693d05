#pragma once
// The machine's measured fp32 FMA peak, for the CPU benchmarks' "% of peak" columns: `threads`
// threads at once, each running independent chains of fused multiply-adds on the widest vectors
// this CPU has (AVX-512, else AVX2), for about `seconds`. Best of three tries: on a shared machine
// the best shows what the cores can do. Also the AVX512-BF16 dot-product peak (vdpbf16ps, 4 flops
// per fp32 lane), 0 on a CPU without it. Benchmarks only.
#include <algorithm>
#include <chrono>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ddim::bench {

enum class PeakKind { Fp32Fma, Bf16Dot };

namespace detail {

// Independent accumulators: at least latency x pipes (4 x 2 on current x86 cores), and few enough
// to stay in registers with the two constants (16 ymm registers without AVX-512, 32 zmm with it).
constexpr int kChains = 16, kChainsYmm = 12;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline float fma_zmm(long iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 b = _mm512_set1_ps(0.9999f), c = _mm512_set1_ps(1e-6f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}
__attribute__((target("avx2,fma"))) inline float fma_ymm(long iters) {
  __m256 acc[kChainsYmm];
  for (int i = 0; i < kChainsYmm; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-6f);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChainsYmm; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
  }
  for (int i = 1; i < kChainsYmm; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  alignas(32) float out[8];
  _mm256_store_ps(out, acc[0]);
  return out[0];
}
__attribute__((target("avx512f,avx512bf16"))) inline float dot_bf16(long iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3000);
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
  }
  for (int i = 1; i < kChains; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}
#endif

}  // namespace detail

// GFLOP/s of `threads` threads together; 0 when the CPU lacks the instructions.
inline double measured_peak_gflops(int threads, PeakKind kind = PeakKind::Fp32Fma, double seconds = 0.2) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  if (kind == PeakKind::Bf16Dot ? !bf16 : !(avx512 || avx2)) return 0.0;
  const double flops_per_iter = kind == PeakKind::Bf16Dot ? detail::kChains * 64.0    // per thread
                                : avx512                  ? detail::kChains * 32.0
                                                          : detail::kChainsYmm * 16.0;
  auto body = [&](long iters) {
    volatile float sink = kind == PeakKind::Bf16Dot ? detail::dot_bf16(iters)
                          : avx512                  ? detail::fma_zmm(iters)
                                                    : detail::fma_ymm(iters);
    (void)sink;
  };
  // Calibrate the iteration count on one thread, then time every thread at once.
  long iters = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    body(iters);
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (t > seconds / 8 || iters > (1L << 40)) {
      iters = static_cast<long>(static_cast<double>(iters) * seconds / std::max(t, 1e-9));
      break;
    }
    iters *= 4;
  }
  double best = 0.0;
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::vector<std::thread> pool;
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < threads; ++i) pool.emplace_back([&] { body(iters); });
    for (std::thread& t : pool) t.join();
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, flops_per_iter * static_cast<double>(iters) * threads / t * 1e-9);
  }
  return best;
#else
  (void)threads;
  (void)kind;
  (void)seconds;
  return 0.0;
#endif
}

}  // namespace ddim::bench
