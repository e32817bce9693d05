// CPU reference kernels against naive references written here (plain nested loops, double
// accumulation), at the U-Net's real shapes. Every output lives in a guarded buffer: sentinel
// NaNs before and after (checked bitwise afterwards) and a different NaN pattern inside, so an
// element the op forgot to write fails the finite check. Also checked bitwise: a sample's result
// does not depend on its batch, and nothing depends on the thread count.
//
// Tolerances are abs + rel * |ref| against the double reference:
//  - gemm / conv / linear / attention: fp32 accumulation over K ~ 1e2..1e3 terms (FMA or
//    multiply-add chains) differs from the exact sum by ~sqrt(K) * 2^-24 * sum|terms|, ~1e-5
//    with the O(1) data used here; 1e-4 leaves a 10x margin and still catches any indexing bug
//    (which shows up as O(1) errors).
//  - group_norm: statistics in double, the normalisation in float: a few ulp of O(1) values.
//  - element-wise ops: exact or one rounding.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"

using namespace ddim::cpu;

namespace {

// ---------------------------------------------------------------- data
struct Rng {
  std::uint64_t state;
  explicit Rng(std::uint64_t seed) : state(seed) {}
  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform(float lo = -1.0f, float hi = 1.0f) {
    const float u = static_cast<float>(next() >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    return lo + (hi - lo) * u;
  }
};

std::vector<float> random_vec(std::size_t n, std::uint64_t seed, float scale = 1.0f, float offset = 0.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = offset + scale * rng.uniform();
  return v;
}

// ---------------------------------------------------------------- guarded outputs
constexpr std::uint32_t kGuardBits = 0x7FC0DEADu;  // sentinel around the output
constexpr std::uint32_t kUnsetBits = 0x7FA5A5A5u;  // inside, until the op writes it
constexpr std::size_t kGuard = 67;                 // odd, so the output is not 64-byte aligned

float from_bits(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
std::uint32_t to_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}

struct Guarded {
  std::vector<float> buf;
  std::size_t n;
  explicit Guarded(std::size_t count) : buf(count + 2 * kGuard, from_bits(kGuardBits)), n(count) {
    std::fill(buf.begin() + kGuard, buf.begin() + static_cast<std::ptrdiff_t>(kGuard + n), from_bits(kUnsetBits));
  }
  float* data() { return buf.data() + kGuard; }
  const float* data() const { return buf.data() + kGuard; }
  float operator[](std::size_t i) const { return data()[i]; }
  bool guards_intact() const {
    for (std::size_t i = 0; i < kGuard; ++i)
      if (to_bits(buf[i]) != kGuardBits || to_bits(buf[kGuard + n + i]) != kGuardBits) return false;
    return true;
  }
};

// Finite, guards intact, and |out - ref| <= atol + rtol * |ref| everywhere.
void check_close(const char* what, const Guarded& out, const std::vector<double>& ref, double atol, double rtol) {
  REQUIRE(out.n == ref.size());
  CHECK_MESSAGE(out.guards_intact(), what, ": write outside the output");
  std::size_t non_finite = 0, bad = 0, first_bad = 0;
  double max_err = 0.0, max_ratio = 0.0;
  for (std::size_t i = 0; i < out.n; ++i) {
    const double v = out[i];
    if (!std::isfinite(v)) {
      if (non_finite++ == 0 && bad == 0) first_bad = i;
      continue;
    }
    const double err = std::fabs(v - ref[i]);
    const double tol = atol + rtol * std::fabs(ref[i]);
    max_err = std::max(max_err, err);
    max_ratio = std::max(max_ratio, err / tol);
    if (err > tol && bad++ == 0 && non_finite == 0) first_bad = i;
  }
  INFO(what, ": ", out.n, " values, max |err| = ", max_err, " (", max_ratio, " of the tolerance), first bad index ",
       first_bad, " got ", out[first_bad], " want ", ref[first_bad]);
  CHECK(non_finite == 0);
  CHECK(bad == 0);
}

bool bitwise_equal(const float* a, const float* b, std::size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

// Restores the automatic gemm kernel when a test that forced one ends.
struct KernelGuard {
  ~KernelGuard() { gemm_select_kernel(GemmKernel::Auto); }
};

// ---------------------------------------------------------------- naive references (double)
std::vector<double> ref_gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, const float* C0,
                             int ldc) {
  std::vector<double> c(static_cast<std::size_t>(M) * N);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      double s = C0 ? C0[static_cast<std::size_t>(i) * ldc + j] : 0.0;
      for (int k = 0; k < K; ++k)
        s += static_cast<double>(A[static_cast<std::size_t>(i) * lda + k]) * B[static_cast<std::size_t>(k) * ldb + j];
      c[static_cast<std::size_t>(i) * N + j] = s;
    }
  return c;
}

std::vector<double> ref_conv2d(const Conv2dShape& s, const float* x, const float* wt, const float* bias) {
  const int oh = s.out_h(), ow = s.out_w();
  std::vector<double> y(static_cast<std::size_t>(s.n) * s.cout * oh * ow);
  for (int b = 0; b < s.n; ++b)
    for (int co = 0; co < s.cout; ++co)
      for (int oy = 0; oy < oh; ++oy)
        for (int ox = 0; ox < ow; ++ox) {
          double acc = bias ? bias[co] : 0.0;
          for (int ci = 0; ci < s.cin; ++ci)
            for (int ky = 0; ky < s.kh; ++ky) {
              const int iy = oy * s.stride_h - s.pad_t + ky;
              if (iy < 0 || iy >= s.h) continue;
              for (int kx = 0; kx < s.kw; ++kx) {
                const int ix = ox * s.stride_w - s.pad_l + kx;
                if (ix < 0 || ix >= s.w) continue;
                acc += static_cast<double>(x[((static_cast<std::size_t>(b) * s.cin + ci) * s.h + iy) * s.w + ix]) *
                       wt[((static_cast<std::size_t>(co) * s.cin + ci) * s.kh + ky) * s.kw + kx];
              }
            }
          y[((static_cast<std::size_t>(b) * s.cout + co) * oh + oy) * ow + ox] = acc;
        }
  return y;
}

std::vector<double> ref_group_norm(const std::vector<float>& x, int n, int c, int hw, int groups, double eps,
                                   const std::vector<float>& gamma, const std::vector<float>& beta, bool silu_after) {
  std::vector<double> y(x.size());
  const int cpg = c / groups;
  for (int b = 0; b < n; ++b)
    for (int g = 0; g < groups; ++g) {
      const std::size_t base = (static_cast<std::size_t>(b) * c + static_cast<std::size_t>(g) * cpg) * hw;
      const std::size_t len = static_cast<std::size_t>(cpg) * hw;
      double mean = 0.0, var = 0.0;
      for (std::size_t i = 0; i < len; ++i) mean += x[base + i];
      mean /= static_cast<double>(len);
      for (std::size_t i = 0; i < len; ++i) var += (x[base + i] - mean) * (x[base + i] - mean);
      var /= static_cast<double>(len);
      for (int ci = 0; ci < cpg; ++ci)
        for (int i = 0; i < hw; ++i) {
          const std::size_t idx = base + static_cast<std::size_t>(ci) * hw + i;
          double v = (x[idx] - mean) / std::sqrt(var + eps) * gamma[static_cast<std::size_t>(g * cpg + ci)] +
                     beta[static_cast<std::size_t>(g * cpg + ci)];
          if (silu_after) v = v / (1.0 + std::exp(-v));
          y[idx] = v;
        }
    }
  return y;
}

struct AttnParams {
  int c, hw, d, heads;
  std::vector<float> wq, bq, wk, bk, wv, bv, wo, bo;
  AttnParams(int c_, int hw_, int d_, int heads_, bool biases, std::uint64_t seed)
      : c(c_), hw(hw_), d(d_), heads(heads_) {
    const float sc = 1.0f / std::sqrt(static_cast<float>(c)), sd = 1.0f / std::sqrt(static_cast<float>(d));
    wq = random_vec(static_cast<std::size_t>(d) * c, seed + 1, sc);
    wk = random_vec(static_cast<std::size_t>(d) * c, seed + 2, sc);
    wv = random_vec(static_cast<std::size_t>(d) * c, seed + 3, sc);
    wo = random_vec(static_cast<std::size_t>(c) * d, seed + 4, sd);
    if (biases) {
      bq = random_vec(static_cast<std::size_t>(d), seed + 5, 0.1f);
      bk = random_vec(static_cast<std::size_t>(d), seed + 6, 0.1f);
      bv = random_vec(static_cast<std::size_t>(d), seed + 7, 0.1f);
      bo = random_vec(static_cast<std::size_t>(c), seed + 8, 0.1f);
    }
  }
  AttentionWeights weights() const {
    auto p = [](const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); };
    return AttentionWeights{wq.data(), p(bq), wk.data(), p(bk), wv.data(), p(bv), wo.data(), p(bo)};
  }
};

std::vector<double> ref_attention(const AttnParams& a, const float* x, const float* residual, int n, float scale,
                                  float rescale) {
  const int c = a.c, hw = a.hw, d = a.d, hd = a.d / a.heads;
  std::vector<double> y(static_cast<std::size_t>(n) * c * hw);
  std::vector<double> q(static_cast<std::size_t>(hw) * d), k(q.size()), v(q.size()), o(q.size()), p(hw);
  auto bias = [](const std::vector<float>& b, int i) { return b.empty() ? 0.0 : static_cast<double>(b[i]); };
  for (int b = 0; b < n; ++b) {
    const float* xs = x + static_cast<std::size_t>(b) * c * hw;
    for (int i = 0; i < hw; ++i)
      for (int f = 0; f < d; ++f) {
        double sq = bias(a.bq, f), sk = bias(a.bk, f), sv = bias(a.bv, f);
        for (int ch = 0; ch < c; ++ch) {
          const double xv = xs[static_cast<std::size_t>(ch) * hw + i];
          sq += a.wq[static_cast<std::size_t>(f) * c + ch] * xv;
          sk += a.wk[static_cast<std::size_t>(f) * c + ch] * xv;
          sv += a.wv[static_cast<std::size_t>(f) * c + ch] * xv;
        }
        q[static_cast<std::size_t>(i) * d + f] = sq;
        k[static_cast<std::size_t>(i) * d + f] = sk;
        v[static_cast<std::size_t>(i) * d + f] = sv;
      }
    for (int h = 0; h < a.heads; ++h)
      for (int i = 0; i < hw; ++i) {
        double mx = -1e300;
        for (int j = 0; j < hw; ++j) {
          double s = 0.0;
          for (int f = h * hd; f < (h + 1) * hd; ++f)
            s += q[static_cast<std::size_t>(i) * d + f] * k[static_cast<std::size_t>(j) * d + f];
          p[static_cast<std::size_t>(j)] = s * scale;
          mx = std::max(mx, p[static_cast<std::size_t>(j)]);
        }
        double sum = 0.0;
        for (int j = 0; j < hw; ++j)
          sum += (p[static_cast<std::size_t>(j)] = std::exp(p[static_cast<std::size_t>(j)] - mx));
        for (int f = h * hd; f < (h + 1) * hd; ++f) {
          double s = 0.0;
          for (int j = 0; j < hw; ++j)
            s += p[static_cast<std::size_t>(j)] / sum * v[static_cast<std::size_t>(j) * d + f];
          o[static_cast<std::size_t>(i) * d + f] = s;
        }
      }
    for (int ch = 0; ch < c; ++ch)
      for (int i = 0; i < hw; ++i) {
        double s = bias(a.bo, ch);
        for (int f = 0; f < d; ++f)
          s += a.wo[static_cast<std::size_t>(ch) * d + f] * o[static_cast<std::size_t>(i) * d + f];
        const std::size_t idx = (static_cast<std::size_t>(b) * c + ch) * hw + i;
        if (residual) s += residual[idx];
        y[idx] = s / rescale;
      }
  }
  return y;
}

// ---------------------------------------------------------------- op runners
Guarded run_conv(const Conv2dShape& s, const float* x, const float* w, const float* bias, ThreadPool* pool) {
  Guarded y(static_cast<std::size_t>(s.n) * s.cout * s.out_h() * s.out_w());
  conv2d(s, x, w, bias, y.data(), pool);
  return y;
}

Guarded run_attention(const AttnParams& a, const float* x, const float* residual, int n, float scale, float rescale,
                      ThreadPool* pool) {
  Guarded y(static_cast<std::size_t>(n) * a.c * a.hw);
  std::vector<float> scratch(attention_scratch_floats(n, a.c, a.hw, a.d, pool));
  attention(x, residual, n, a.c, a.hw, a.d, a.heads, scale, a.weights(), rescale, y.data(), scratch.data(), pool);
  return y;
}

Guarded run_group_norm(const std::vector<float>& x, int n, int c, int hw, int groups, const std::vector<float>& gamma,
                       const std::vector<float>& beta, bool silu_after, ThreadPool* pool) {
  Guarded y(x.size());
  group_norm(x.data(), n, c, hw, groups, 1e-6f, gamma.data(), beta.data(), silu_after, y.data(), pool);
  return y;
}

Guarded run_linear(const std::vector<float>& x, int n, int in, const std::vector<float>& w, const std::vector<float>& b,
                   int out, ThreadPool* pool) {
  Guarded y(static_cast<std::size_t>(n) * out);
  linear(x.data(), n, in, w.data(), b.empty() ? nullptr : b.data(), out, y.data(), pool);
  return y;
}

Conv2dShape conv_shape(int n, int cin, int h, int w, int cout, int k, int stride, int pad) {
  return Conv2dShape{n, cin, h, w, cout, k, k, stride, stride, pad, pad, pad, pad};
}

void check_conv(const Conv2dShape& s, ThreadPool* pool, std::uint64_t seed) {
  const std::size_t k = static_cast<std::size_t>(s.cin) * s.kh * s.kw;
  const auto x = random_vec(static_cast<std::size_t>(s.n) * s.cin * s.h * s.w, seed);
  const auto w = random_vec(static_cast<std::size_t>(s.cout) * k, seed + 1, 1.0f / std::sqrt(static_cast<float>(k)));
  const auto b = random_vec(static_cast<std::size_t>(s.cout), seed + 2, 0.5f);
  const Guarded y = run_conv(s, x.data(), w.data(), b.data(), pool);
  check_close("conv2d", y, ref_conv2d(s, x.data(), w.data(), b.data()), 1e-4, 1e-4);
  const Guarded y_nobias = run_conv(s, x.data(), w.data(), nullptr, pool);
  check_close("conv2d without bias", y_nobias, ref_conv2d(s, x.data(), w.data(), nullptr), 1e-4, 1e-4);
}

}  // namespace

// ================================================================ thread pool
TEST_CASE("cpu thread_pool: parallel_for covers every index exactly once") {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    CHECK(pool.size() == threads);
    for (std::int64_t count : {0, 1, 2, 3, 7, 64, 1000, 100003}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(count));
      for (auto& h : hits) h.store(0);
      std::atomic<std::int64_t> calls{0}, empty_ranges{0};
      pool.parallel_for(count, [&](std::int64_t b, std::int64_t e) {
        if (b >= e) empty_ranges.fetch_add(1);
        calls.fetch_add(1);
        for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)].fetch_add(1);
      });
      bool all_once = true;
      for (auto& h : hits) all_once = all_once && h.load() == 1;
      CHECK_MESSAGE(all_once, "threads=", threads, " count=", count);
      CHECK(empty_ranges.load() == 0);
      CHECK(calls.load() <= std::max<std::int64_t>(count, 0));
    }
  }
  ThreadPool automatic(0);
  CHECK(automatic.size() >= 1);
}

TEST_CASE("cpu thread_pool: many small jobs in a row, and the free parallel_for without a pool") {
  ThreadPool pool(2);
  std::int64_t total = 0;
  for (int job = 0; job < 3000; ++job) {
    std::vector<std::int64_t> partial(4, 0);
    pool.parallel_for(4, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) partial[static_cast<std::size_t>(i)] = i + job;
    });
    for (std::int64_t p : partial) total += p;
  }
  CHECK(total == 3000 * 6 + 4 * (2999 * 3000 / 2));
  std::int64_t seen = 0;
  parallel_for(nullptr, 10, [&](std::int64_t b, std::int64_t e) { seen += e - b; });
  CHECK(seen == 10);
  parallel_for(nullptr, 0, [&](std::int64_t, std::int64_t) { FAIL("called for an empty range"); });
}

TEST_CASE("cpu thread_pool: an exception in a task is rethrown and the pool stays usable") {
  ThreadPool pool(2);
  for (int round = 0; round < 20; ++round) {
    CHECK_THROWS_WITH_AS(pool.parallel_for(100,
                                           [&](std::int64_t b, std::int64_t e) {
                                             for (std::int64_t i = b; i < e; ++i)
                                               if (i == 57) throw std::runtime_error("task 57 failed");
                                           }),
                         "task 57 failed", std::runtime_error);
    std::atomic<std::int64_t> sum{0};
    pool.parallel_for(100, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) sum.fetch_add(i);
    });
    CHECK(sum.load() == 4950);
  }
}

TEST_CASE("cpu thread_pool: parallel_for from inside a task is refused with ddim::Error") {
  ThreadPool pool(2);
  bool got_error = false;
  try {
    pool.parallel_for(4, [&](std::int64_t, std::int64_t) { pool.parallel_for(2, [](std::int64_t, std::int64_t) {}); });
  } catch (const ddim::Error& e) {
    got_error = e.code() == ddim::ErrorCode::Internal;
  }
  CHECK(got_error);
  std::atomic<int> ok{0};
  pool.parallel_for(2, [&](std::int64_t b, std::int64_t e) { ok.fetch_add(static_cast<int>(e - b)); });
  CHECK(ok.load() == 2);
}

// ================================================================ gemm
TEST_CASE("cpu gemm: odd sizes and padded leading dimensions against a naive product, with accumulate") {
  ThreadPool pool(2);
  struct Case {
    int M, N, K;
  };
  const Case cases[] = {{1, 1, 1},
                        {1, 37, 5},
                        {13, 1, 300},
                        {7, 33, 257},
                        {100, 65, 513},
                        {9, 17, 1},
                        {129, 257, 3},
                        {64, 64, 64},
                        {200, 300, 600},
                        {5, 1030, 19},
                        // Large enough N or M that the packed operand is split into chunks.
                        {3, 6000, 1152},
                        {5500, 3, 1152}};
  for (const Case& cs : cases) {
    for (bool accumulate : {false, true}) {
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
        const int lda = cs.K + 3, ldb = cs.N + 5, ldc = cs.N + 2;
        const std::uint64_t seed = static_cast<std::uint64_t>(cs.M) * 1000003u +
                                   static_cast<std::uint64_t>(cs.N) * 101u + static_cast<std::uint64_t>(cs.K);
        const auto A =
            random_vec(static_cast<std::size_t>(cs.M) * lda, seed, 1.0f / std::sqrt(static_cast<float>(cs.K)));
        const auto B = random_vec(static_cast<std::size_t>(cs.K) * ldb, seed + 1);
        const auto C0 = random_vec(static_cast<std::size_t>(cs.M) * ldc, seed + 2);
        Guarded C(static_cast<std::size_t>(cs.M) * ldc);
        std::copy(C0.begin(), C0.end(), C.data());
        gemm(cs.M, cs.N, cs.K, A.data(), lda, B.data(), ldb, C.data(), ldc, accumulate, p);
        const auto ref =
            ref_gemm(cs.M, cs.N, cs.K, A.data(), lda, B.data(), ldb, accumulate ? C0.data() : nullptr, ldc);
        // The padding columns of C (between N and ldc) must be untouched.
        std::vector<double> ref_full(C.n);
        for (int i = 0; i < cs.M; ++i)
          for (int j = 0; j < ldc; ++j)
            ref_full[static_cast<std::size_t>(i) * ldc + j] =
                j < cs.N ? ref[static_cast<std::size_t>(i) * cs.N + j] : C0[static_cast<std::size_t>(i) * ldc + j];
        INFO("M=", cs.M, " N=", cs.N, " K=", cs.K, " accumulate=", accumulate, " pool=", p != nullptr);
        check_close("gemm", C, ref_full, 1e-4, 1e-4);
        bool padding_untouched = true;
        for (int i = 0; i < cs.M; ++i)
          for (int j = cs.N; j < ldc; ++j)
            padding_untouched = padding_untouched && to_bits(C[static_cast<std::size_t>(i) * ldc + j]) ==
                                                         to_bits(C0[static_cast<std::size_t>(i) * ldc + j]);
        CHECK(padding_untouched);
      }
    }
  }
  // K == 0: C = 0, or unchanged when accumulating.
  std::vector<float> c(6, 3.0f);
  gemm(2, 3, 0, nullptr, 1, nullptr, 3, c.data(), 3, true, &pool);
  CHECK(c[5] == 3.0f);
  gemm(2, 3, 0, nullptr, 1, nullptr, 3, c.data(), 3, false, &pool);
  CHECK(c[5] == 0.0f);
  CHECK_THROWS_AS(gemm(2, 3, 4, c.data(), 2, c.data(), 3, c.data(), 3, false, nullptr), ddim::Error);
}

TEST_CASE("cpu gemm: every kernel this CPU has matches the reference, and the FMA kernels agree bitwise") {
  KernelGuard restore;
  INFO("automatic kernel: ", gemm_kernel_name());
  ThreadPool pool(2);
  const int M = 77, N = 203, K = 1152;
  const auto A = random_vec(static_cast<std::size_t>(M) * K, 11, 1.0f / std::sqrt(static_cast<float>(K)));
  const auto B = random_vec(static_cast<std::size_t>(K) * N, 12);
  const auto ref = ref_gemm(M, N, K, A.data(), K, B.data(), N, nullptr, N);
  std::vector<std::vector<float>> fma_results;
  for (GemmKernel k : {GemmKernel::Portable, GemmKernel::Avx2Fma, GemmKernel::Avx512}) {
    if (!gemm_select_kernel(k)) {
      MESSAGE("kernel not supported by this CPU, skipped: ", static_cast<int>(k));
      continue;
    }
    Guarded C(static_cast<std::size_t>(M) * N);
    gemm(M, N, K, A.data(), K, B.data(), N, C.data(), N, false, &pool);
    INFO("kernel ", gemm_kernel_name());
    check_close("gemm kernel", C, ref, 1e-4, 1e-4);
    if (k != GemmKernel::Portable) fma_results.emplace_back(C.data(), C.data() + C.n);
  }
  if (fma_results.size() == 2)
    CHECK(bitwise_equal(fma_results[0].data(), fma_results[1].data(), fma_results[0].size()));
}

TEST_CASE("cpu gemm: an element does not depend on M, N or the thread count (bitwise)") {
  KernelGuard restore;
  ThreadPool one(1), two(2), three(3);
  const int M = 150, N = 333, K = 700;
  const auto A = random_vec(static_cast<std::size_t>(M) * K, 21);
  const auto B = random_vec(static_cast<std::size_t>(K) * N, 22);
  const auto C0 = random_vec(static_cast<std::size_t>(M) * N, 23);
  for (GemmKernel k : {GemmKernel::Portable, GemmKernel::Avx2Fma, GemmKernel::Avx512}) {
    if (!gemm_select_kernel(k)) continue;
    INFO("kernel ", gemm_kernel_name());
    for (bool accumulate : {false, true}) {
      std::vector<float> full = C0;
      gemm(M, N, K, A.data(), K, B.data(), N, full.data(), N, accumulate, &two);
      for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &one, &three}) {
        std::vector<float> again = C0;
        gemm(M, N, K, A.data(), K, B.data(), N, again.data(), N, accumulate, p);
        CHECK(bitwise_equal(full.data(), again.data(), full.size()));
      }
      // Single rows (M = 1) and a row range starting mid-panel.
      for (int row : {0, 7, 149}) {
        std::vector<float> r(C0.begin() + static_cast<std::ptrdiff_t>(row) * N,
                             C0.begin() + static_cast<std::ptrdiff_t>(row + 1) * N);
        gemm(1, N, K, A.data() + static_cast<std::size_t>(row) * K, K, B.data(), N, r.data(), N, accumulate, &two);
        CHECK(bitwise_equal(r.data(), full.data() + static_cast<std::size_t>(row) * N, static_cast<std::size_t>(N)));
      }
      std::vector<float> rows(C0.begin() + 5 * N, C0.begin() + 68 * N);
      gemm(63, N, K, A.data() + 5 * K, K, B.data(), N, rows.data(), N, accumulate, &two);
      CHECK(bitwise_equal(rows.data(), full.data() + 5 * N, rows.size()));
      // A column range starting mid-panel (N split differently).
      std::vector<float> cols(static_cast<std::size_t>(M) * 50);
      for (int i = 0; i < M; ++i)
        std::copy_n(C0.begin() + static_cast<std::ptrdiff_t>(i) * N + 19, 50,
                    cols.begin() + static_cast<std::ptrdiff_t>(i) * 50);
      gemm(M, 50, K, A.data(), K, B.data() + 19, N, cols.data(), 50, accumulate, &two);
      bool same = true;
      for (int i = 0; i < M; ++i)
        same = same && bitwise_equal(cols.data() + static_cast<std::size_t>(i) * 50,
                                     full.data() + static_cast<std::size_t>(i) * N + 19, 50);
      CHECK(same);
    }
  }
}

// ================================================================ conv2d
TEST_CASE("cpu conv2d: 3x3 128->256 at 16x16, pad 1") {
  ThreadPool pool(2);
  check_conv(conv_shape(1, 128, 16, 16, 256, 3, 1, 1), &pool, 100);
}

TEST_CASE("cpu conv2d: 3x3 3->128 at 32x32, pad 1 (the U-Net's conv_in), batch 2") {
  ThreadPool pool(2);
  check_conv(conv_shape(2, 3, 32, 32, 128, 3, 1, 1), &pool, 200);
}

TEST_CASE("cpu conv2d: 1x1 256->128 reads the input directly") {
  ThreadPool pool(2);
  const Conv2dShape s = conv_shape(2, 256, 16, 16, 128, 1, 1, 0);
  const auto x = random_vec(static_cast<std::size_t>(s.n) * s.cin * s.h * s.w, 300);
  const auto w = random_vec(static_cast<std::size_t>(s.cout) * s.cin, 301, 1.0f / 16.0f);
  const auto b = random_vec(static_cast<std::size_t>(s.cout), 302);
  Guarded y(static_cast<std::size_t>(s.n) * s.cout * s.h * s.w);
  conv2d(s, x.data(), w.data(), b.data(), y.data(), &pool);
  check_close("conv2d 1x1", y, ref_conv2d(s, x.data(), w.data(), b.data()), 1e-4, 1e-4);
}

TEST_CASE("cpu conv2d: 3x3 stride 2 with asymmetric padding (0,1,0,1), the downsampler") {
  ThreadPool pool(2);
  Conv2dShape s{2, 64, 16, 16, 64, 3, 3, 2, 2, 0, 1, 0, 1};
  CHECK(s.out_h() == 8);
  CHECK(s.out_w() == 8);
  check_conv(s, &pool, 400);
  Conv2dShape odd{1, 16, 15, 13, 8, 3, 3, 2, 2, 0, 1, 0, 1};  // odd input sizes
  check_conv(odd, &pool, 410);
}

TEST_CASE("cpu conv2d: non-square inputs and kernels (H != W)") {
  ThreadPool pool(2);
  check_conv(conv_shape(1, 32, 12, 20, 48, 3, 1, 1), &pool, 500);
  check_conv(Conv2dShape{2, 8, 9, 17, 5, 5, 3, 1, 2, 2, 1, 0, 3}, &pool, 510);   // 5x3 kernel, stride (1,2)
  check_conv(Conv2dShape{1, 4, 7, 6, 3, 7, 6, 1, 1, 0, 0, 0, 0}, nullptr, 520);  // kernel covers the input
}

TEST_CASE("cpu conv2d: a large input, and small planes whose gemm panels span several samples") {
  ThreadPool pool(2);
  check_conv(conv_shape(1, 256, 64, 64, 8, 3, 1, 1), &pool, 600);
  check_conv(conv_shape(5, 64, 4, 4, 40, 3, 1, 1), &pool, 610);              // 16 pixels a sample
  check_conv(Conv2dShape{3, 16, 5, 3, 24, 3, 3, 1, 1, 1, 1, 1, 1}, &pool, 620);  // 15 pixels a sample
  check_conv(conv_shape(7, 48, 2, 2, 16, 1, 1, 0), &pool, 630);              // 1x1 on 2x2 planes
}

TEST_CASE("cpu conv2d: the fused epilogue equals the separate bias, time-embedding and residual adds, bitwise") {
  ThreadPool pool(2);
  for (const Conv2dShape s : {conv_shape(3, 32, 8, 8, 40, 3, 1, 1), conv_shape(2, 24, 4, 4, 16, 1, 1, 0)}) {
    const std::size_t plane = static_cast<std::size_t>(s.out_h()) * s.out_w();
    const std::size_t out = static_cast<std::size_t>(s.n) * s.cout * plane;
    const auto x = random_vec(static_cast<std::size_t>(s.n) * s.cin * s.h * s.w, 700);
    const auto w = random_vec(static_cast<std::size_t>(s.cout) * s.cin * s.kh * s.kw, 701, 0.1f);
    const auto bias = random_vec(static_cast<std::size_t>(s.cout), 702);
    const auto temb = random_vec(static_cast<std::size_t>(s.n) * s.cout, 703);
    const auto res = random_vec(out, 704);
    // Separately: conv + bias, then the broadcast add, then the residual add.
    const Guarded conv = run_conv(s, x.data(), w.data(), bias.data(), &pool);
    std::vector<float> separate(out);
    add_broadcast(conv.data(), temb.data(), s.n, s.cout, static_cast<int>(plane), 1.0f, separate.data());
    add(separate.data(), res.data(), out, 1.0f, separate.data());
    // Fused, with the weights packed once for the process-wide kernel.
    PackedA packed;
    pack_conv_weights(s, w.data(), selected_fp32_kernel(), packed, &pool);
    ConvEpilogue e;
    e.bias = bias.data();
    e.temb = temb.data();
    e.residual = res.data();
    Guarded fused(out);
    conv2d_packed(s, x.data(), packed, e, fused.data(), &pool);
    CHECK(fused.guards_intact());
    CHECK(bitwise_equal(fused.data(), separate.data(), out));
    CHECK_THROWS_AS(conv2d_packed(s, x.data(), packed, ConvEpilogue{nullptr, nullptr, fused.data()}, fused.data(), &pool),
                    ddim::Error);  // the residual may not alias the output
  }
}

TEST_CASE("cpu conv2d: bad shapes are a ddim::Error") {
  std::vector<float> buf(4096);
  CHECK_THROWS_AS(conv2d(Conv2dShape{1, 4, 2, 2, 4, 3, 3, 1, 1, 0, 0, 0, 0}, buf.data(), buf.data(), nullptr, buf.data(), nullptr),
                  ddim::Error);
  CHECK_THROWS_AS(conv2d(Conv2dShape{1, 4, 8, 8, 4, 3, 3, 0, 1, 1, 1, 1, 1}, buf.data(), buf.data(), nullptr, buf.data(), nullptr),
                  ddim::Error);
}

// ================================================================ linear
TEST_CASE("cpu linear: 128->512 (the time MLP) and 512->256 without bias") {
  ThreadPool pool(2);
  struct Case {
    int in, out;
    bool with_bias;
  };
  for (const Case cs : {Case{128, 512, true}, Case{512, 256, false}, Case{37, 5, true}}) {
    const int n = 3, in = cs.in, out = cs.out;
    const bool with_bias = cs.with_bias;
    const auto x = random_vec(static_cast<std::size_t>(n) * in, 700 + in);
    const auto w = random_vec(static_cast<std::size_t>(out) * in, 701 + in, 1.0f / std::sqrt(static_cast<float>(in)));
    const auto b = with_bias ? random_vec(static_cast<std::size_t>(out), 702) : std::vector<float>{};
    const Guarded y = run_linear(x, n, in, w, b, out, &pool);
    std::vector<double> ref(static_cast<std::size_t>(n) * out);
    for (int r = 0; r < n; ++r)
      for (int o = 0; o < out; ++o) {
        double s = with_bias ? b[static_cast<std::size_t>(o)] : 0.0;
        for (int i = 0; i < in; ++i)
          s += static_cast<double>(x[static_cast<std::size_t>(r) * in + i]) * w[static_cast<std::size_t>(o) * in + i];
        ref[static_cast<std::size_t>(r) * out + o] = s;
      }
    INFO("in=", in, " out=", out);
    check_close("linear", y, ref, 1e-4, 1e-4);
  }
}

// ================================================================ group_norm
TEST_CASE("cpu group_norm: 32x32x128 and 16x16x256, 32 groups, with and without SiLU") {
  ThreadPool pool(2);
  struct Case {
    int n, c, hw;
  };
  for (const Case cs : {Case{2, 128, 32 * 32}, Case{1, 256, 16 * 16}}) {
    // An offset and a non-unit spread, as real activations have.
    const auto x = random_vec(static_cast<std::size_t>(cs.n) * cs.c * cs.hw, 800 + cs.c, 3.0f, 0.7f);
    const auto gamma = random_vec(static_cast<std::size_t>(cs.c), 801, 0.5f, 1.0f);
    const auto beta = random_vec(static_cast<std::size_t>(cs.c), 802, 0.5f);
    for (bool s : {false, true}) {
      const Guarded y = run_group_norm(x, cs.n, cs.c, cs.hw, 32, gamma, beta, s, &pool);
      INFO("c=", cs.c, " hw=", cs.hw, " silu=", s);
      check_close("group_norm", y, ref_group_norm(x, cs.n, cs.c, cs.hw, 32, 1e-6, gamma, beta, s), 2e-5, 2e-5);
    }
  }
  std::vector<float> v(12, 1.0f);
  CHECK_THROWS_AS(group_norm(v.data(), 1, 6, 2, 4, 1e-5f, v.data(), v.data(), false, v.data(), nullptr), ddim::Error);
}

// ================================================================ attention
TEST_CASE("cpu attention: 256 tokens x 256 channels, one head, with residual (the DDPM AttnBlock)") {
  ThreadPool pool(2);
  const AttnParams a(256, 256, 256, 1, true, 900);
  const auto x = random_vec(static_cast<std::size_t>(a.c) * a.hw, 910);
  const auto res = random_vec(x.size(), 911);
  const float scale = 1.0f / std::sqrt(256.0f);
  const Guarded y = run_attention(a, x.data(), res.data(), 1, scale, 1.0f, &pool);
  check_close("attention 256", y, ref_attention(a, x.data(), res.data(), 1, scale, 1.0f), 1e-4, 1e-4);
}

TEST_CASE("cpu attention: 256 tokens x 512 channels, one head, with residual") {
  ThreadPool pool(2);
  const AttnParams a(512, 256, 512, 1, true, 920);
  const auto x = random_vec(static_cast<std::size_t>(a.c) * a.hw, 930);
  const auto res = random_vec(x.size(), 931);
  const float scale = 1.0f / std::sqrt(512.0f);
  const Guarded y = run_attention(a, x.data(), res.data(), 1, scale, 1.0f, &pool);
  check_close("attention 512", y, ref_attention(a, x.data(), res.data(), 1, scale, 1.0f), 1e-4, 1e-4);
}

TEST_CASE("cpu attention: 4 heads, no residual, rescale 2, no biases, batch 2") {
  ThreadPool pool(2);
  const AttnParams a(256, 64, 256, 4, false, 940);
  const auto x = random_vec(static_cast<std::size_t>(2) * a.c * a.hw, 950, 2.0f);  // sharper softmax
  const float scale = 1.0f / std::sqrt(64.0f);
  const Guarded y = run_attention(a, x.data(), nullptr, 2, scale, 2.0f, &pool);
  check_close("attention 4 heads", y, ref_attention(a, x.data(), nullptr, 2, scale, 2.0f), 1e-4, 1e-4);
  // The output projection adds the residual in its epilogue: the two may not share memory.
  const AttnParams b(64, 16 * 16, 128, 2, true, 960);
  auto inplace = random_vec(static_cast<std::size_t>(b.c) * b.hw, 970);
  const auto xb = random_vec(inplace.size(), 971);
  std::vector<float> scratch(attention_scratch_floats(1, b.c, b.hw, b.d, &pool));
  CHECK_THROWS_AS(attention(xb.data(), inplace.data(), 1, b.c, b.hw, b.d, b.heads, 0.125f, b.weights(), 1.0f,
                            inplace.data(), scratch.data(), &pool),
                  ddim::Error);
  CHECK_THROWS_AS(attention_scratch_floats(1, 8, 8, 0, nullptr), ddim::Error);
}

TEST_CASE("cpu attention: 600 tokens run in query blocks (256, 256, 88) and match the reference; bounded scratch") {
  ThreadPool pool(2);
  const AttnParams a(64, 600, 64, 1, true, 980);
  const auto x = random_vec(static_cast<std::size_t>(2) * a.c * a.hw, 990, 2.0f);
  const auto res = random_vec(x.size(), 991);
  const float scale = 1.0f / std::sqrt(64.0f);
  const Guarded y = run_attention(a, x.data(), res.data(), 2, scale, 1.0f, &pool);
  check_close("attention 600 tokens", y, ref_attention(a, x.data(), res.data(), 2, scale, 1.0f), 1e-4, 1e-4);
  // Blocking changes no bit: the second sample alone, on one thread, equals its row of the batch.
  const std::size_t len = static_cast<std::size_t>(a.c) * a.hw;
  const std::vector<float> x1(x.begin() + static_cast<std::ptrdiff_t>(len), x.end());
  const std::vector<float> r1(res.begin() + static_cast<std::ptrdiff_t>(len), res.end());
  const Guarded y1 = run_attention(a, x1.data(), r1.data(), 1, scale, 1.0f, nullptr);
  CHECK(std::memcmp(y1.data(), y.data() + len, len * sizeof(float)) == 0);
  // The decoder's mid-block attention (4096 tokens x 512 channels at 64x64 latents): the scratch
  // holds q, k, v, o and one 4096 x 256 block of scores, never the 4096 x 4096 matrix.
  const std::size_t floats = attention_scratch_floats(1, 512, 4096, 512, nullptr);
  CHECK(floats == std::size_t(4) * 512 * 4096 + std::size_t(4096) * 256 + 2 * 256);
  CHECK(floats < std::size_t(4096) * 4096);
}

// ================================================================ batch and thread-count independence
TEST_CASE("cpu ops: each sample of a batch of 3 equals the sample run alone, bitwise, and pools of 1, 2, 3 agree") {
  ThreadPool one(1), two(2), three(3);
  const int n = 3;
  auto sample = [](const auto& v, int b, std::size_t len) { return v.data() + static_cast<std::size_t>(b) * len; };

  SUBCASE("conv2d 3x3 and 1x1") {
    // Planes of 256, 64, 16 and 15 pixels: gemm panels inside a sample and across samples.
    for (const Conv2dShape s_batch : {conv_shape(n, 64, 16, 16, 96, 3, 1, 1), conv_shape(n, 96, 8, 8, 64, 1, 1, 0),
                                      Conv2dShape{n, 32, 16, 16, 32, 3, 3, 2, 2, 0, 1, 0, 1},
                                      conv_shape(n, 64, 4, 4, 72, 3, 1, 1), Conv2dShape{n, 8, 5, 3, 16, 3, 3, 1, 1, 1, 1, 1, 1}}) {
      Conv2dShape s1 = s_batch;
      s1.n = 1;
      const std::size_t in_len = static_cast<std::size_t>(s1.cin) * s1.h * s1.w;
      const std::size_t out_len = static_cast<std::size_t>(s1.cout) * s1.out_h() * s1.out_w();
      const auto x = random_vec(in_len * n, 1000);
      const auto w = random_vec(static_cast<std::size_t>(s1.cout) * s1.cin * s1.kh * s1.kw, 1001, 0.05f);
      const auto bias = random_vec(static_cast<std::size_t>(s1.cout), 1002);
      const Guarded batch = run_conv(s_batch, x.data(), w.data(), bias.data(), &two);
      const Guarded batch1 = run_conv(s_batch, x.data(), w.data(), bias.data(), &one);
      const Guarded batch3 = run_conv(s_batch, x.data(), w.data(), bias.data(), &three);
      CHECK(bitwise_equal(batch.data(), batch1.data(), batch.n));
      CHECK(bitwise_equal(batch.data(), batch3.data(), batch.n));
      for (int b = 0; b < n; ++b) {
        const Guarded alone = run_conv(s1, sample(x, b, in_len), w.data(), bias.data(), b == 1 ? nullptr : &two);
        CHECK_MESSAGE(bitwise_equal(alone.data(), batch.data() + b * out_len, out_len), "sample ", b);
      }
    }
  }
  SUBCASE("group_norm") {
    const int c = 128, hw = 256;
    const std::size_t len = static_cast<std::size_t>(c) * hw;
    const auto x = random_vec(len * n, 1100, 2.0f, 0.3f);
    const auto g = random_vec(static_cast<std::size_t>(c), 1101, 0.5f, 1.0f);
    const auto be = random_vec(static_cast<std::size_t>(c), 1102);
    const Guarded batch = run_group_norm(x, n, c, hw, 32, g, be, true, &two);
    const Guarded batch1 = run_group_norm(x, n, c, hw, 32, g, be, true, &one);
    CHECK(bitwise_equal(batch.data(), batch1.data(), batch.n));
    for (int b = 0; b < n; ++b) {
      const std::vector<float> xb(sample(x, b, len), sample(x, b, len) + len);
      const Guarded alone = run_group_norm(xb, 1, c, hw, 32, g, be, true, nullptr);
      CHECK_MESSAGE(bitwise_equal(alone.data(), batch.data() + b * len, len), "sample ", b);
    }
  }
  SUBCASE("attention") {
    const AttnParams a(128, 64, 128, 2, true, 1200);
    const std::size_t len = static_cast<std::size_t>(a.c) * a.hw;
    const auto x = random_vec(len * n, 1210);
    const auto res = random_vec(len * n, 1211);
    const Guarded batch = run_attention(a, x.data(), res.data(), n, 0.125f, 1.0f, &two);
    const Guarded batch1 = run_attention(a, x.data(), res.data(), n, 0.125f, 1.0f, &one);
    const Guarded batch3 = run_attention(a, x.data(), res.data(), n, 0.125f, 1.0f, &three);
    CHECK(bitwise_equal(batch.data(), batch1.data(), batch.n));
    CHECK(bitwise_equal(batch.data(), batch3.data(), batch.n));
    for (int b = 0; b < n; ++b) {
      const Guarded alone = run_attention(a, sample(x, b, len), sample(res, b, len), 1, 0.125f, 1.0f, nullptr);
      CHECK_MESSAGE(bitwise_equal(alone.data(), batch.data() + b * len, len), "sample ", b);
    }
  }
  SUBCASE("linear") {
    const int in = 128, out = 512;
    const auto x = random_vec(static_cast<std::size_t>(n) * in, 1300);
    const auto w = random_vec(static_cast<std::size_t>(out) * in, 1301, 0.1f);
    const auto bias = random_vec(static_cast<std::size_t>(out), 1302);
    const Guarded batch = run_linear(x, n, in, w, bias, out, &two);
    const Guarded batch1 = run_linear(x, n, in, w, bias, out, &one);
    CHECK(bitwise_equal(batch.data(), batch1.data(), batch.n));
    for (int b = 0; b < n; ++b) {
      const std::vector<float> xb(sample(x, b, in), sample(x, b, in) + in);
      const Guarded alone = run_linear(xb, 1, in, w, bias, out, nullptr);
      CHECK_MESSAGE(bitwise_equal(alone.data(), batch.data() + static_cast<std::size_t>(b) * out, out), "sample ", b);
    }
  }
}

// ================================================================ element-wise and data movement
TEST_CASE("cpu silu, add, add_broadcast, scale_shift") {
  const std::size_t count = 1000;
  auto x = random_vec(count, 1400, 12.0f);
  x[0] = -100.0f;  // exp(-x) overflows: the result must still be finite (-0)
  x[1] = 100.0f;
  const auto y2 = random_vec(count, 1401);

  Guarded s(count);
  silu(x.data(), count, s.data());
  std::vector<double> ref(count);
  for (std::size_t i = 0; i < count; ++i) ref[i] = x[i] / (1.0 + std::exp(-static_cast<double>(x[i])));
  check_close("silu", s, ref, 1e-6, 1e-6);

  for (float divisor : {1.0f, 1.41421356f}) {
    Guarded a(count);
    add(x.data(), y2.data(), count, divisor, a.data());
    for (std::size_t i = 0; i < count; ++i) ref[i] = (static_cast<double>(x[i]) + y2[i]) / divisor;
    check_close("add", a, ref, 1e-6, 1e-6);
  }

  const int n = 2, c = 5, hw = 100;
  const auto b = random_vec(static_cast<std::size_t>(n) * c, 1402);
  for (float divisor : {1.0f, 2.0f}) {
    Guarded ab(count);
    add_broadcast(x.data(), b.data(), n, c, hw, divisor, ab.data());
    for (std::size_t i = 0; i < count; ++i) ref[i] = (static_cast<double>(x[i]) + b[i / hw]) / divisor;
    check_close("add_broadcast", ab, ref, 1e-6, 1e-6);
  }

  Guarded ss(count);
  scale_shift(x.data(), count, 0.5f, -1.25f, ss.data());
  for (std::size_t i = 0; i < count; ++i) ref[i] = static_cast<double>(x[i]) * 0.5 - 1.25;
  check_close("scale_shift", ss, ref, 1e-6, 1e-6);
}

TEST_CASE("cpu concat_channels, upsample_nearest2x, avg_pool2x") {
  const int n = 2, hw = 12;
  const int cs[3] = {3, 1, 4};
  const auto x0 = random_vec(static_cast<std::size_t>(n) * 3 * hw, 1500);
  const auto x1 = random_vec(static_cast<std::size_t>(n) * 1 * hw, 1501);
  const auto x2 = random_vec(static_cast<std::size_t>(n) * 4 * hw, 1502);
  const float* xs[3] = {x0.data(), x1.data(), x2.data()};
  Guarded y(static_cast<std::size_t>(n) * 8 * hw);
  concat_channels(xs, cs, 3, n, hw, y.data());
  std::vector<double> ref;
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < 3; ++i) {
      const std::size_t len = static_cast<std::size_t>(cs[i]) * hw;
      for (std::size_t j = 0; j < len; ++j) ref.push_back(xs[i][b * len + j]);
    }
  check_close("concat_channels", y, ref, 0.0, 0.0);

  const int c = 3, h = 5, w = 7;
  const auto u = random_vec(static_cast<std::size_t>(n) * c * h * w, 1503);
  Guarded up(static_cast<std::size_t>(n) * c * 4 * h * w);
  upsample_nearest2x(u.data(), n, c, h, w, up.data());
  std::vector<double> ref_up(up.n);
  for (int p = 0; p < n * c; ++p)
    for (int oy = 0; oy < 2 * h; ++oy)
      for (int ox = 0; ox < 2 * w; ++ox)
        ref_up[(static_cast<std::size_t>(p) * 2 * h + oy) * 2 * w + ox] =
            u[(static_cast<std::size_t>(p) * h + oy / 2) * w + ox / 2];
  check_close("upsample_nearest2x", up, ref_up, 0.0, 0.0);

  const int ph = 6, pw = 10;
  const auto v = random_vec(static_cast<std::size_t>(n) * c * ph * pw, 1504);
  Guarded pooled(static_cast<std::size_t>(n) * c * (ph / 2) * (pw / 2));
  avg_pool2x(v.data(), n, c, ph, pw, pooled.data());
  std::vector<double> ref_pool(pooled.n);
  for (int p = 0; p < n * c; ++p)
    for (int oy = 0; oy < ph / 2; ++oy)
      for (int ox = 0; ox < pw / 2; ++ox) {
        double s = 0.0;
        for (int dy = 0; dy < 2; ++dy)
          for (int dx = 0; dx < 2; ++dx) s += v[(static_cast<std::size_t>(p) * ph + 2 * oy + dy) * pw + 2 * ox + dx];
        ref_pool[(static_cast<std::size_t>(p) * (ph / 2) + oy) * (pw / 2) + ox] = s / 4.0;
      }
  check_close("avg_pool2x", pooled, ref_pool, 1e-6, 1e-6);
}

// ================================================================ timestep embedding
// Two double-precision references. (1) The exact formula, no intermediate rounding: the float32
// pipeline that diffusers defines (and we mirror) rounds exp's result (~6e-8 relative, x 999) and
// then the argument t * freq (half an ulp of 999 is 3e-5), so sin/cos differ from the exact values
// by up to ~1e-4 at t = 999: 5e-4 per unit of scale. (2) The same formula in double with the values
// rounded to float where torch's float32 ops round (a float * or / computed in double and rounded
// is exactly the float op): then only exp/sin/cos may differ by an ulp, and 1e-5 holds for every t
// up to 999.
TEST_CASE("cpu timestep_embedding: against double formulas, flip, freq_shift, scale, odd dim") {
  struct Case {
    int dim;
    bool flip;
    float shift, max_period, scale;
  };
  const Case cases[] = {{128, false, 1.0f, 10000.0f, 1.0f},  // DDPM (google/ddpm-*)
                        {128, true, 0.0f, 10000.0f, 1.0f},   // diffusers' flip_sin_to_cos default
                        {33, true, 1.0f, 10000.0f, 1.0f},    // odd dim: zero pad
                        {64, false, 0.0f, 1000.0f, 2.5f}};
  const std::vector<float> t = {0.0f, 1.0f, 37.5f, 500.0f, 998.0f, 999.0f};
  const int n = static_cast<int>(t.size());
  for (const Case& cs : cases) {
    Guarded y(static_cast<std::size_t>(n) * cs.dim);
    timestep_embedding(t.data(), n, cs.dim, cs.flip, cs.shift, cs.max_period, cs.scale, y.data());
    const int half = cs.dim / 2;
    std::vector<double> exact(y.n), rounded(y.n);
    for (int b = 0; b < n; ++b)
      for (int i = 0; i < half; ++i) {
        const double freq =
            std::exp(-std::log(static_cast<double>(cs.max_period)) * i / (half - static_cast<double>(cs.shift)));
        const double arg = static_cast<double>(cs.scale) * t[static_cast<std::size_t>(b)] * freq;
        // Float rounding points of the float32 pipeline.
        const float e0 = static_cast<float>(
            static_cast<double>(static_cast<float>(-std::log(static_cast<double>(cs.max_period)))) * i);
        const float e1 =
            static_cast<float>(static_cast<double>(e0) / static_cast<float>(half - static_cast<double>(cs.shift)));
        const float f = static_cast<float>(std::exp(static_cast<double>(e1)));
        const float a0 = static_cast<float>(static_cast<double>(t[static_cast<std::size_t>(b)]) * f);
        const float a1 = static_cast<float>(static_cast<double>(cs.scale) * a0);
        const std::size_t row = static_cast<std::size_t>(b) * cs.dim;
        const std::size_t sin_at = row + (cs.flip ? half + i : i), cos_at = row + (cs.flip ? i : half + i);
        exact[sin_at] = std::sin(arg);
        exact[cos_at] = std::cos(arg);
        rounded[sin_at] = std::sin(static_cast<double>(a1));
        rounded[cos_at] = std::cos(static_cast<double>(a1));
      }
    INFO("dim=", cs.dim, " flip=", cs.flip, " shift=", cs.shift, " max_period=", cs.max_period, " scale=", cs.scale);
    check_close("timestep_embedding vs the float32 rounding points", y, rounded, 1e-5, 0.0);
    check_close("timestep_embedding vs the exact formula", y, exact, 5e-4 * cs.scale, 0.0);
    if (cs.dim % 2 == 1)
      for (int b = 0; b < n; ++b) CHECK(to_bits(y[static_cast<std::size_t>(b) * cs.dim + cs.dim - 1]) == 0u);
  }
}
