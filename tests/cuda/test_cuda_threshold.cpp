// cuda::dynamic_thresholds (kernels/threshold.cu) against the host's ddim::dynamic_threshold
// (engine/schedule/ddim_step.cpp), bit for bit, per sample of a batch. Suite "gpu": needs a CUDA
// device (see tests/cpp/main.cpp).
//
// Expectations: every finite (or infinite) threshold equals the host's bitwise. NaN results: a
// sample holding a NaN gives the host's quiet NaN (0x7fc00000) on both sides, bitwise; a NaN the
// interpolation produces (an infinite order statistic: inf - inf, 0 * inf) is NaN on both sides,
// where the device always returns 0x7fc00000 and the host's sign bit is the CPU's default NaN's
// (so only "both NaN" is required there).
//
// Every device buffer has guard bytes that must be intact afterwards; the thresholds are poisoned
// with 0xFF (NaN) and the scratch with 0x5A before each call, so an unwritten threshold or a kernel
// that relies on a clean scratch fails.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ios>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "cuda/threshold.hpp"
#include "ddim/error.hpp"
#include "gpu_util.hpp"
#include "schedule/ddim_params.hpp"

using namespace ddim;
namespace g = ddim::test::gpu;

namespace {

constexpr std::uint32_t kQuietNaN = 0x7fc00000u;

std::uint32_t bits(float v) {
  std::uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}
float from_bits(std::uint32_t u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// The host's thresholds, one per sample.
std::vector<float> host_thresholds(const std::vector<float>& x, int n, std::size_t E, double ratio, double max_value) {
  std::vector<float> r(static_cast<std::size_t>(n));
  for (int b = 0; b < n; ++b)
    r[std::size_t(b)] = dynamic_threshold(std::span<const float>(x.data() + std::size_t(b) * E, E), ratio, max_value);
  return r;
}

// Device buffers for one batch shape, reusable across calls.
struct Bufs {
  int n;
  std::size_t E;
  g::DevBytes x0, thr, scratch;
  Bufs(int samples, std::size_t values)
      : n(samples),
        E(values),
        x0(std::size_t(samples) * values * sizeof(float)),
        thr(std::size_t(samples) * sizeof(float)),
        scratch(cuda::dynamic_threshold_scratch_bytes(samples, values)) {}
  void prepare(const std::vector<float>& x) {
    REQUIRE(x.size() == std::size_t(n) * E);
    x0.upload(x.data());
    thr.fill(0xFF);
    scratch.fill(0x5A);
  }
  void launch(double ratio, double max_value, cudaStream_t stream = nullptr) {
    cuda::dynamic_thresholds(static_cast<const float*>(x0.data()), n, E, ratio, max_value,
                             static_cast<float*>(thr.data()), scratch.data(), scratch.bytes(), stream);
  }
  std::vector<float> read() {
    std::vector<float> r(static_cast<std::size_t>(n));
    thr.download(r.data());
    return r;
  }
  void check_guards() {
    CHECK(x0.guards_intact());
    CHECK(thr.guards_intact());
    CHECK(scratch.guards_intact());
  }
};

void expect_equal(const std::vector<float>& got, const std::vector<float>& ref) {
  REQUIRE(got.size() == ref.size());
  for (std::size_t b = 0; b < ref.size(); ++b) {
    INFO("sample " << b << ": got " << got[b] << " (0x" << std::hex << bits(got[b]) << "), host " << ref[b] << " (0x"
                   << bits(ref[b]) << std::dec << ")");
    if (std::isnan(ref[b])) CHECK(bits(got[b]) == kQuietNaN);
    else CHECK(bits(got[b]) == bits(ref[b]));
  }
}

// One call on x (n samples of E values) against the host, guards checked.
void check_case(const std::vector<float>& x, int n, std::size_t E, double ratio, double max_value) {
  INFO("n " << n << ", E " << E << ", ratio " << ratio << ", max_value " << max_value);
  Bufs d(n, E);
  d.prepare(x);
  d.launch(ratio, max_value);
  g::sync();
  expect_equal(d.read(), host_thresholds(x, n, E, ratio, max_value));
  d.check_guards();
}

constexpr double kRatios[] = {0.995, 0.5, 1.0, 1e-6};

// Uniform values in [-scale_b, scale_b], scale_b growing with the sample (some samples' quantile
// below 1, others above).
std::vector<float> uniform_batch(int n, std::size_t E, std::uint32_t seed) {
  std::vector<float> x = g::random_vector(std::size_t(n) * E, seed, -1.f, 1.f);
  for (int b = 0; b < n; ++b)
    for (std::size_t i = 0; i < E; ++i) x[std::size_t(b) * E + i] *= 0.6f + 1.3f * float(b);
  return x;
}

// Random bit patterns with exponent fields 0 (zero, subnormals) to 226 (about 1e30), either sign.
std::vector<float> wide_range_batch(std::size_t count, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::uint32_t> exponent(0, 226), mantissa(0, 0x7fffffu), sign(0, 1);
  std::vector<float> x(count);
  for (float& v : x) v = from_bits(sign(gen) << 31 | exponent(gen) << 23 | mantissa(gen));
  return x;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("dynamic_thresholds: uniform values, batch sizes, sample sizes and ratios match the host bitwise") {
    for (std::size_t E : {std::size_t(1), std::size_t(2), std::size_t(3), std::size_t(17), std::size_t(4096),
                          std::size_t(196608)}) {
      for (int n : {1, 3}) {
        const auto x = uniform_batch(n, E, std::uint32_t(E * 7 + std::size_t(n)));
        for (double ratio : kRatios)
          for (double max_value : {1e9, 2.0}) check_case(x, n, E, ratio, max_value);
      }
    }
  }

  TEST_CASE("dynamic_thresholds: a batch of 256 samples") {
    const int n = 256;
    const std::size_t E = 4096;
    auto x = g::random_vector(std::size_t(n) * E, 99, -1.f, 1.f);
    for (int b = 0; b < n; ++b)
      for (std::size_t i = 0; i < E; ++i) x[std::size_t(b) * E + i] *= 0.02f * float(b + 1);
    check_case(x, n, E, 0.995, 3.0);
    check_case(x, n, E, 0.5, 1e9);
  }

  TEST_CASE("dynamic_thresholds: many ties (values from a small set) and all-equal samples") {
    const float set[] = {0.f, -0.f, 0.25f, -0.25f, 1.f, -1.f, 1.5f, -1.5f, 3.f, -3.f};
    for (std::size_t E : {std::size_t(17), std::size_t(4096), std::size_t(196608)}) {
      const int n = 2;
      std::mt19937 gen(static_cast<std::uint32_t>(E));
      std::uniform_int_distribution<int> pick(0, 9);
      std::vector<float> x(std::size_t(n) * E);
      for (float& v : x) v = set[pick(gen)];
      for (double ratio : kRatios) check_case(x, n, E, ratio, 1e9);
      // Almost all equal, a few larger values at the top.
      std::vector<float> y(std::size_t(n) * E, 2.5f);
      for (std::size_t i = 0; i < 3 && i < E; ++i) y[i * 5 % E] = -7.f;
      for (double ratio : kRatios) check_case(y, n, E, ratio, 1e9);
    }
    for (float v : {2.5f, -2.5f, 0.f, -0.f, 0.5f, 1e30f, std::numeric_limits<float>::denorm_min()})
      for (std::size_t E : {std::size_t(1), std::size_t(17), std::size_t(4096)}) {
        const std::vector<float> x(3 * E, v);
        for (double ratio : kRatios) check_case(x, 3, E, ratio, 1e9);
      }
  }

  TEST_CASE("dynamic_thresholds: values from subnormals to 1e30") {
    for (std::size_t E : {std::size_t(2), std::size_t(17), std::size_t(4096), std::size_t(196608)}) {
      const int n = 2;
      const auto x = wide_range_batch(std::size_t(n) * E, std::uint32_t(E + 5));
      for (double ratio : kRatios)
        for (double max_value : {1e38, 1e20, 1e300}) check_case(x, n, E, ratio, max_value);
    }
    // Only zeros and subnormals: the quantile is below 1, so the threshold is 1.
    std::vector<float> sub(4096);
    std::mt19937 gen(3);
    std::uniform_int_distribution<std::uint32_t> mantissa(0, 0x7fffffu);
    for (float& v : sub) v = from_bits((gen() & 1u) << 31 | mantissa(gen));
    for (double ratio : kRatios) check_case(sub, 1, sub.size(), ratio, 1e9);
    // max_value below the subnormal quantiles: the clamp returns max_value, 0 as a float.
    for (double ratio : kRatios) check_case(sub, 1, sub.size(), ratio, 1e-300);
  }

  TEST_CASE("dynamic_thresholds: negative zeros") {
    // All -0: the quantile is 0, clamped to 1.
    const std::vector<float> zeros(2 * 17, -0.f);
    for (double ratio : kRatios) check_case(zeros, 2, 17, ratio, 1e9);
    // Mostly +-0 with a few large values: the lower order statistic is 0 (from -0), the upper large.
    std::vector<float> x(2 * 4096);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = i % 2 ? -0.f : 0.f;
    for (std::size_t i = 0; i < 40; ++i) x[i * 97 % x.size()] = -4.f - float(i);
    for (double ratio : {0.995, 0.9975, 0.999, 1.0, 0.5}) check_case(x, 2, 4096, ratio, 1e9);
  }

  TEST_CASE("dynamic_thresholds: the clamp at 1 and at max_value") {
    const int n = 3;
    const std::size_t E = 4096;
    const auto x = uniform_batch(n, E, 11);  // quantiles about 0.6, 1.9, 3.2
    // max_value above every quantile, between them, below 1 (max wins), exactly 1, and not a float.
    for (double max_value : {100.0, 2.5, 1.7, 1.0, 0.3, 1.0 + 1e-12})
      for (double ratio : kRatios) check_case(x, n, E, ratio, max_value);
  }

  TEST_CASE("dynamic_thresholds: NaN and infinity") {
    const int n = 3;
    const std::size_t E = 4096;
    auto x = uniform_batch(n, E, 21);
    // A NaN in sample 1 (either sign): that sample's threshold is the quiet NaN, bitwise on both
    // sides (the host returns quiet_NaN() before sorting); the others are unaffected.
    x[E + 100] = std::numeric_limits<float>::quiet_NaN();
    x[E + 200] = -std::numeric_limits<float>::quiet_NaN();
    for (double ratio : kRatios) {
      INFO("ratio " << ratio);
      Bufs d(n, E);
      d.prepare(x);
      d.launch(ratio, 1e9);
      g::sync();
      const auto got = d.read(), ref = host_thresholds(x, n, E, ratio, 1e9);
      CHECK(bits(ref[1]) == kQuietNaN);
      CHECK(bits(got[1]) == kQuietNaN);
      CHECK(bits(got[0]) == bits(ref[0]));
      CHECK(bits(got[2]) == bits(ref[2]));
      d.check_guards();
    }
    // +-inf in sample 2 (no NaN): below the selected ranks the result is exact; with ratio 1 both
    // order statistics are inf and inf - inf makes the host's result NaN (then: NaN on both sides).
    auto y = uniform_batch(n, E, 22);
    y[2 * E + 7] = std::numeric_limits<float>::infinity();
    y[2 * E + 9] = -std::numeric_limits<float>::infinity();
    for (double ratio : kRatios)
      for (double max_value : {1e9, std::numeric_limits<double>::infinity()}) check_case(y, n, E, ratio, max_value);
  }

  TEST_CASE("dynamic_thresholds: repeated calls reuse the scratch; a captured graph replays on new data") {
    const int n = 2;
    const std::size_t E = 4096;
    Bufs d(n, E);
    const auto a = uniform_batch(n, E, 31), b = wide_range_batch(std::size_t(n) * E, 32);
    d.prepare(a);
    d.launch(0.995, 1e9);
    g::sync();
    expect_equal(d.read(), host_thresholds(a, n, E, 0.995, 1e9));
    d.x0.upload(b.data());  // the scratch keeps what the first call left
    d.launch(0.995, 1e38);
    g::sync();
    expect_equal(d.read(), host_thresholds(b, n, E, 0.995, 1e38));

    cudaStream_t stream = nullptr;
    GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    GPU_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    d.launch(0.5, 1e38, stream);
    GPU_CHECK(cudaStreamEndCapture(stream, &graph));
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (const auto* x : {&a, &b}) {
      d.x0.upload(x->data());
      d.thr.fill(0xFF);
      GPU_CHECK(cudaGraphLaunch(exec, stream));
      GPU_CHECK(cudaStreamSynchronize(stream));
      expect_equal(d.read(), host_thresholds(*x, n, E, 0.5, 1e38));
    }
    GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaGraphDestroy(graph));
    GPU_CHECK(cudaStreamDestroy(stream));
    d.check_guards();
  }

  TEST_CASE("dynamic_thresholds: invalid arguments throw before launching; n = 0 does nothing") {
    CHECK(cuda::dynamic_threshold_scratch_bytes(0, 100) == 0);
    CHECK(cuda::dynamic_threshold_scratch_bytes(-1, 100) == 0);
    CHECK(cuda::dynamic_threshold_scratch_bytes(3, 100) == cuda::dynamic_threshold_scratch_bytes(3, 196608));
    const int n = 2;
    const std::size_t E = 17;
    Bufs d(n, E);
    d.prepare(std::vector<float>(n * E, 1.5f));
    const auto* x0 = static_cast<const float*>(d.x0.data());
    auto* thr = static_cast<float*>(d.thr.data());
    void* s = d.scratch.data();
    const std::size_t sb = d.scratch.bytes();
    auto code = [](auto&& f) {
      try {
        f();
      } catch (const Error& e) {
        return e.code();
      }
      return ErrorCode::Internal;  // no throw
    };
    const auto bad = ErrorCode::InvalidArgument;
    CHECK(code([&] { cuda::dynamic_thresholds(x0, n, 0, 0.5, 1e9, thr, s, sb, nullptr); }) == bad);
    for (double ratio : {0.0, -0.5, 1.5, std::numeric_limits<double>::quiet_NaN()})
      CHECK(code([&] { cuda::dynamic_thresholds(x0, n, E, ratio, 1e9, thr, s, sb, nullptr); }) == bad);
    CHECK(code([&] { cuda::dynamic_thresholds(x0, -1, E, 0.5, 1e9, thr, s, sb, nullptr); }) == bad);
    CHECK(code([&] { cuda::dynamic_thresholds(x0, n, E, 0.5, 1e9, thr, s, sb - 1, nullptr); }) == bad);
    CHECK(code([&] { cuda::dynamic_thresholds(nullptr, n, E, 0.5, 1e9, thr, s, sb, nullptr); }) == bad);
    CHECK(code([&] { cuda::dynamic_thresholds(x0, n, E, 0.5, 1e9, thr, nullptr, sb, nullptr); }) == bad);
    // The host function rejects the same arguments.
    const std::vector<float> one(E, 1.f);
    CHECK(code([&] { dynamic_threshold(std::span<const float>(), 0.5, 1e9); }) == bad);
    CHECK(code([&] { dynamic_threshold(one, 1.5, 1e9); }) == bad);
    // n = 0: nothing is enqueued (null pointers allowed).
    CHECK_NOTHROW(cuda::dynamic_thresholds(nullptr, 0, E, 0.5, 1e9, nullptr, nullptr, 0, nullptr));
    g::sync();
    // Nothing was written: the thresholds still hold the poison.
    const auto got = d.read();
    for (float v : got) CHECK(bits(v) == 0xffffffffu);
    d.check_guards();
  }
}
