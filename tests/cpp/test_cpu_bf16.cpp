// The CPU backend's bf16 path (--precision bf16): GEMM operands rounded to bf16 (round to
// nearest even), products accumulated in fp32 by AVX512-BF16's vdpbf16ps; everything else (the
// activations between layers, GroupNorm, softmax, the epilogues, the sampler) in fp32. On a CPU
// without AVX512-BF16 (or with DDIM_CPU_ISA below avx512_bf16) a bf16 session is a ddim::Error
// naming the missing feature; the cases that need the instructions then check only that.
//
// Accuracy against the fp32 path (measured on this project's machine; the bounds allow 2-3x):
//   bundled model (weights/default.ddim), forward, 4 inputs, t = 999, 500, 10:
//     max |bf16 - fp32| <= 1.1% of max |fp32| (bound 3%)
//   bundled model, 50-step DDIM samples, seeds 0-3 (eta 0, the model's clipping):
//     max |bf16 - fp32| = 0.06 on images in [-1, 1] (bound 0.15)
//   cifar10-32 preset (random weights, seed 1), forward, 2 inputs: <= 0.8% of max |fp32| (bound 2%)
//   cifar10-32 preset, 50-step sample without clipping: max |diff| = 0.62 where max |x| = 493,
//     1.3e-3 of the scale (bound 5e-3). (With clipping a random-weight model's 50-step trajectory is
//     chaotic: single pixels flip between -1 and 1 in fp32 against itself under any perturbation,
//     so the max difference says nothing there; a trained model, above, is stable.)
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "cpu/gemm_core.hpp"
#include "cpu/isa.hpp"
#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"
#include "test_util.hpp"

using namespace ddim;

namespace {

bool have_bf16() { return cpu::isa_supported(cpu::Isa::Avx512Bf16) && cpu::active_isa() >= cpu::Isa::Avx512Bf16; }

float bf16_round(float f) {  // round to nearest even, as the packing does
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

std::vector<float> wave(std::size_t n, double f, double a) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = float(a * std::sin(f * double(i) + 0.3));
  return v;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, double(std::fabs(x)));
  return m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, double(std::fabs(a[i] - b[i])));
  return m;
}

std::unique_ptr<Session> session(std::shared_ptr<const Model> m, int batch, Precision p) {
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.batch = batch;
  o.threads = 2;
  o.precision = p;
  return Session::create(std::move(m), o);
}

std::shared_ptr<const Model> bundled_model() {
  const auto path = std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "weights" / "default.ddim";
  return Model::load(path.string());
}

// forward: max |bf16 - fp32| / max |fp32| over a few timesteps; sample: max |bf16 - fp32|
// (relative to max |fp32| when `relative`).
void check_accuracy(const char* what, std::shared_ptr<const Model> model, int batch, double forward_bound,
                    const SampleOptions& so, int sample_batch, double sample_bound, bool relative) {
  const auto& info = model->info();
  const auto x = wave(std::size_t(batch) * info.in_channels * info.height * info.width, 0.37, 1.2);
  auto f32 = session(model, batch, Precision::FP32);
  auto b16 = session(model, batch, Precision::BF16);
  CHECK(b16->plan_info().precision == "bf16");
  for (int t : {999, 500, 10}) {
    const auto ref = f32->forward(x, std::vector<int>{t});
    const double err = max_abs_diff(b16->forward(x, std::vector<int>{t}), ref) / max_abs(ref);
    MESSAGE(std::string(what), " forward t=", t, ": max |bf16 - fp32| = ", err, " of max |fp32|");
    CHECK(err <= forward_bound);
  }
  const auto ref = session(model, sample_batch, Precision::FP32)->sample(so).images;
  const auto got = session(model, sample_batch, Precision::BF16)->sample(so).images;
  const double d = max_abs_diff(got, ref), scale = max_abs(ref);
  MESSAGE(std::string(what), " ", so.steps, "-step sample: max |bf16 - fp32| = ", d, " (max |fp32| = ", scale, ")");
  CHECK(d <= sample_bound * (relative ? scale : 1.0));
}

}  // namespace

TEST_CASE("cpu bf16: a CPU (or DDIM_CPU_ISA level) without AVX512-BF16 refuses bf16 sessions, naming the feature") {
  auto model = test::tiny_model();
  for (const char* level : {"portable", "avx2", "avx512"}) {
    if (!cpu::isa_supported(cpu::parse_isa(level))) continue;
    const char* old = std::getenv("DDIM_CPU_ISA");
    const std::string saved = old ? old : "";
    ::setenv("DDIM_CPU_ISA", level, 1);
    try {
      session(model, 1, Precision::BF16);
      FAIL("bf16 accepted at DDIM_CPU_ISA=", level);
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Unsupported);
      CHECK(test::contains(e.what(), "AVX512-BF16"));
      CHECK(test::contains(e.what(), "AMX-BF16"));
      CHECK(test::contains(e.what(), std::string("DDIM_CPU_ISA=") + level));
    }
    if (old) ::setenv("DDIM_CPU_ISA", saved.c_str(), 1);
    else ::unsetenv("DDIM_CPU_ISA");
  }
  if (!have_bf16()) {
    try {
      session(model, 1, Precision::BF16);
      FAIL("bf16 accepted on a CPU without AVX512-BF16");
    } catch (const Error& e) {
      CHECK(test::contains(e.what(), "AVX512-BF16"));
    }
  }
  // fp16 stays a CUDA-only precision.
  CHECK_THROWS_AS(session(model, 1, Precision::FP16), Error);
}

TEST_CASE("cpu bf16: the gemm is the exact product of the bf16-rounded operands, up to fp32 accumulation") {
  if (!have_bf16()) return;  // the case above checked the error
  cpu::ThreadPool pool(2);
  const cpu::KernelSpec& spec = cpu::kernel_spec(cpu::active_isa(), cpu::GemmPrecision::Bf16);
  for (int K : {1, 2, 7, 300, 1153}) {
    const int M = 37, N = 71;
    const auto A = wave(std::size_t(M) * K, 0.13, 1.0), B = wave(std::size_t(K) * N, 0.71, 1.0);
    std::vector<float> C(std::size_t(M) * N, 0.0f);
    cpu::gemm_general(M, N, K, A.data(), K, 1, B.data(), N, C.data(), N, false, spec, &pool);
    double worst = 0;
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        double exact = 0, mag = 0;
        for (int k = 0; k < K; ++k) {
          const double p = double(bf16_round(A[std::size_t(i) * K + k])) * double(bf16_round(B[std::size_t(k) * N + j]));
          exact += p;
          mag += std::fabs(p);
        }
        // fp32 accumulation of K exact products: at most K * 2^-24 * sum |p| (far less in practice).
        worst = std::max(worst, std::fabs(double(C[std::size_t(i) * N + j]) - exact) / (K * 0x1p-24 * mag + 1e-30));
      }
    INFO("K=", K, " worst error / (K 2^-24 sum|p|) = ", worst);
    CHECK(worst <= 1.0);
  }
}

TEST_CASE("cpu bf16: a convolution is the exact product of the bf16-rounded input and weights, up to fp32 accumulation") {
  if (!have_bf16()) return;
  const cpu::KernelSpec& spec = cpu::kernel_spec(cpu::active_isa(), cpu::GemmPrecision::Bf16);
  cpu::ThreadPool pool(2);
  // Padding on every side, an odd K (3 x 3 x 3 = 27), panels across samples (4x4 planes), 1x1,
  // stride 2 (the packer without the direct bf16 path).
  for (const cpu::Conv2dShape s : {cpu::Conv2dShape{2, 3, 9, 7, 10, 3, 3, 1, 1, 1, 1, 1, 1},
                                   cpu::Conv2dShape{3, 20, 4, 4, 17, 3, 3, 1, 1, 1, 1, 1, 1},
                                   cpu::Conv2dShape{2, 40, 6, 6, 9, 1, 1, 1, 1, 0, 0, 0, 0},
                                   cpu::Conv2dShape{2, 12, 9, 9, 8, 3, 3, 2, 2, 0, 1, 0, 1}}) {
    const int oh = s.out_h(), ow = s.out_w(), K = s.cin * s.kh * s.kw;
    const auto x = wave(std::size_t(s.n) * s.cin * s.h * s.w, 0.41, 1.0);
    const auto w = wave(std::size_t(s.cout) * K, 0.23, 0.3);
    const auto bias = wave(std::size_t(s.cout), 1.3, 0.2);
    cpu::PackedA packed;
    cpu::pack_conv_weights(s, w.data(), spec, packed, &pool);
    std::vector<float> y(std::size_t(s.n) * s.cout * oh * ow);
    cpu::ConvEpilogue e;
    e.bias = bias.data();
    cpu::conv2d_packed(s, x.data(), packed, e, y.data(), &pool);
    double worst = 0;
    for (int b = 0; b < s.n; ++b)
      for (int co = 0; co < s.cout; ++co)
        for (int oy = 0; oy < oh; ++oy)
          for (int ox = 0; ox < ow; ++ox) {
            double exact = 0, mag = 0;
            for (int ci = 0; ci < s.cin; ++ci)
              for (int ky = 0; ky < s.kh; ++ky)
                for (int kx = 0; kx < s.kw; ++kx) {
                  const int iy = oy * s.stride_h - s.pad_t + ky, ix = ox * s.stride_w - s.pad_l + kx;
                  if (iy < 0 || iy >= s.h || ix < 0 || ix >= s.w) continue;
                  const double p =
                      double(bf16_round(x[((std::size_t(b) * s.cin + ci) * s.h + iy) * s.w + ix])) *
                      double(bf16_round(w[((std::size_t(co) * s.cin + ci) * s.kh + ky) * s.kw + kx]));
                  exact += p;
                  mag += std::fabs(p);
                }
            const double got = double(y[((std::size_t(b) * s.cout + co) * oh + oy) * ow + ox]) - double(bias[co]);
            // the chain's fp32 roundings, and the one of the bias add (half an ulp of the result)
            const double tol = K * 0x1p-24 * mag + 0x1p-24 * (std::fabs(exact) + std::fabs(bias[co])) + 1e-30;
            worst = std::max(worst, std::fabs(got - exact) / tol);
          }
    INFO("conv ", s.cin, "->", s.cout, " ", s.kh, "x", s.kw, " stride ", s.stride_w, ": worst error / bound = ", worst);
    CHECK(worst <= 1.0);
  }
}

TEST_CASE("cpu bf16: a sample's convolution and attention do not depend on its batch or the thread count (bitwise)") {
  if (!have_bf16()) return;
  const cpu::KernelSpec& spec = cpu::kernel_spec(cpu::active_isa(), cpu::GemmPrecision::Bf16);
  cpu::ThreadPool one(1), two(2), three(3);
  const int n = 3;
  for (const cpu::Conv2dShape s : {cpu::Conv2dShape{n, 48, 16, 16, 40, 3, 3, 1, 1, 1, 1, 1, 1},
                                   cpu::Conv2dShape{n, 33, 4, 4, 24, 3, 3, 1, 1, 1, 1, 1, 1},
                                   cpu::Conv2dShape{n, 64, 8, 8, 32, 1, 1, 1, 1, 0, 0, 0, 0}}) {
    const std::size_t in = std::size_t(s.cin) * s.h * s.w, out = std::size_t(s.cout) * s.out_h() * s.out_w();
    const auto x = wave(in * n, 0.29, 1.0), w = wave(std::size_t(s.cout) * s.cin * s.kh * s.kw, 0.53, 0.1);
    cpu::PackedA packed;
    cpu::pack_conv_weights(s, w.data(), spec, packed, &two);
    auto run = [&](const cpu::Conv2dShape& shape, const float* xs, cpu::ThreadPool* pool) {
      std::vector<float> y(std::size_t(shape.n) * out);
      cpu::conv2d_packed(shape, xs, packed, cpu::ConvEpilogue{}, y.data(), pool);
      return y;
    };
    const auto batch = run(s, x.data(), &two);
    CHECK(test::bitwise_equal(batch, run(s, x.data(), &one)));
    CHECK(test::bitwise_equal(batch, run(s, x.data(), &three)));
    cpu::Conv2dShape s1 = s;
    s1.n = 1;
    for (int b = 0; b < n; ++b) {
      const auto alone = run(s1, x.data() + b * in, b == 1 ? nullptr : &two);
      CHECK(test::bitwise_equal(alone, std::vector<float>(batch.begin() + std::ptrdiff_t(b * out),
                                                          batch.begin() + std::ptrdiff_t((b + 1) * out))));
    }
  }
  const int c = 64, hw = 64, d = 64;
  const auto wa = wave(std::size_t(d) * c * 4, 0.7, 0.12), ba = wave(std::size_t(d), 1.1, 0.05);
  const cpu::AttentionWeights aw{wa.data(), ba.data(), wa.data() + d * c, ba.data(), wa.data() + 2 * d * c, ba.data(),
                                 wa.data() + 3 * d * c, ba.data()};
  cpu::PackedAttention pa;
  cpu::pack_attention(aw, c, d, spec, pa, &two);
  const std::size_t len = std::size_t(c) * hw;
  const auto x = wave(len * n, 0.31, 1.0), res = wave(len * n, 0.17, 1.0);
  auto run = [&](int batch, const float* xs, const float* rs, cpu::ThreadPool* pool) {
    std::vector<float> scratch(cpu::attention_scratch_floats(batch, c, hw, d, pool)), y(std::size_t(batch) * len);
    cpu::attention_packed(xs, rs, batch, c, hw, d, 2, 0.125f, pa, 1.0f, y.data(), scratch.data(), pool);
    return y;
  };
  const auto batch = run(n, x.data(), res.data(), &two);
  CHECK(test::bitwise_equal(batch, run(n, x.data(), res.data(), &one)));
  CHECK(test::bitwise_equal(batch, run(n, x.data(), res.data(), &three)));
  for (int b = 0; b < n; ++b) {
    const auto alone = run(1, x.data() + b * len, res.data() + b * len, nullptr);
    CHECK(test::bitwise_equal(alone, std::vector<float>(batch.begin() + std::ptrdiff_t(b * len),
                                                        batch.begin() + std::ptrdiff_t((b + 1) * len))));
  }
}

TEST_CASE("cpu bf16: accuracy against fp32 on the bundled model (forward, 50-step samples)") {
  if (!have_bf16()) return;
  SampleOptions so;
  so.steps = 50;
  so.seed = 0;
  check_accuracy("bundled model", bundled_model(), 4, 0.03, so, 4, 0.15, false);
}

TEST_CASE("cpu bf16: accuracy against fp32 on the cifar10-32 preset (forward, a 50-step sample)") {
  if (!have_bf16()) return;
  auto model = Model::load_from_memory(graph::make_random_model_file(graph::UNetConfig::cifar10(), ScheduleConfig{}, 1),
                                       "cifar10-32");
  SampleOptions so;
  so.steps = 50;
  so.seed = 0;
  so.clip_sample = false;
  check_accuracy("cifar10-32", model, 2, 0.02, so, 1, 5e-3, true);
}
