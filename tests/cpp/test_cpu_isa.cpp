// The CPU backend's instruction-set dispatch (engine/cpu/isa.hpp): DDIM_CPU_ISA selects a level,
// a level this CPU lacks is a clear error, and every level the CPU has computes the same results:
// the FMA levels (avx2, avx512, avx512_bf16) bitwise, the portable level (multiply, then add)
// within a stated bound. CTest also runs all "cpu *" cases under each level (cpu_isa_<level>),
// so every kernel and vector path is exercised on a machine that has it.
//
// Bounds (measured on this project's machine, AVX-512): the portable level's forward of the
// bundled model differs from the FMA levels' by at most 4.6e-7 of the output's largest value, a
// 50-step sample (4 images) by at most 8.3e-6; the tests allow 1e-5 and 1e-4 (each FMA against
// multiply-then-add rounding difference is one rounding of a product, compounded over ~1e2 layers
// and 50 steps).
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
#include "test_util.hpp"

using namespace ddim;
using cpu::Isa;

namespace {

// Sets DDIM_CPU_ISA for a scope (unset: nullopt) and restores what was there.
class IsaEnv {
 public:
  explicit IsaEnv(std::optional<std::string> value) {
    if (const char* old = std::getenv("DDIM_CPU_ISA")) old_ = old;
    if (value) ::setenv("DDIM_CPU_ISA", value->c_str(), 1);
    else ::unsetenv("DDIM_CPU_ISA");
  }
  ~IsaEnv() {
    if (old_) ::setenv("DDIM_CPU_ISA", old_->c_str(), 1);
    else ::unsetenv("DDIM_CPU_ISA");
  }
  IsaEnv(const IsaEnv&) = delete;
  IsaEnv& operator=(const IsaEnv&) = delete;

 private:
  std::optional<std::string> old_;
};

constexpr Isa kLevels[] = {Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16};

std::shared_ptr<const Model> bundled_model() {
  const auto path = std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "weights" / "default.ddim";
  return Model::load(path.string());
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

std::vector<float> test_input(std::size_t n) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = float(1.2 * std::sin(0.37 * double(i)));
  return x;
}

}  // namespace

TEST_CASE("cpu isa: DDIM_CPU_ISA picks the level; one this CPU lacks, or no level at all, is a clear ddim::Error") {
  auto model = test::tiny_model();
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  const Isa best = cpu::detected_isa();
  MESSAGE("this CPU's best level: ", std::string(cpu::to_string(best)));
  {
    IsaEnv env(std::nullopt);
    CHECK(cpu::active_isa() == best);
    CHECK(test::contains(Session::create(model, o)->plan_info().backend, cpu::to_string(best)));
  }
  {
    IsaEnv env(std::string("auto"));
    CHECK(cpu::active_isa() == best);
  }
  for (Isa isa : kLevels) {
    IsaEnv env(std::string(cpu::to_string(isa)));
    std::string missing;
    if (cpu::isa_supported(isa, &missing)) {
      CHECK(cpu::active_isa() == isa);
      CHECK(test::contains(Session::create(model, o)->plan_info().backend, cpu::to_string(isa)));
    } else {
      INFO("level ", std::string(cpu::to_string(isa)), " lacks ", missing);
      try {
        Session::create(model, o);
        FAIL("a level the CPU lacks was accepted");
      } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::Unsupported);
        CHECK(test::contains(e.what(), missing));
      }
    }
  }
  {  // No AMX kernels exist: the level is reported as unavailable, naming what is missing.
    IsaEnv env(std::string("amx"));
    try {
      Session::create(model, o);
      FAIL("DDIM_CPU_ISA=amx was accepted");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Unsupported);
      CHECK(test::contains(e.what(), "DDIM_CPU_ISA=amx"));
      CHECK(test::contains(e.what(), "AMX"));
    }
  }
  {
    IsaEnv env(std::string("sse9"));
    try {
      Session::create(model, o);
      FAIL("an unknown level was accepted");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
      CHECK(test::contains(e.what(), "portable, avx2, avx512, avx512_bf16, amx"));
    }
  }
}

TEST_CASE("cpu isa: every level up to the active one gives the same convolution and attention (FMA levels bitwise)") {
  cpu::ThreadPool pool(2);
  const cpu::Conv2dShape s{3, 40, 12, 12, 72, 3, 3, 1, 1, 1, 1, 1, 1};
  const std::size_t out = std::size_t(s.n) * s.cout * s.out_h() * s.out_w();
  const auto x = test_input(std::size_t(s.n) * s.cin * s.h * s.w);
  std::vector<float> w(std::size_t(s.cout) * s.cin * 9), bias(static_cast<std::size_t>(s.cout));
  for (std::size_t i = 0; i < w.size(); ++i) w[i] = float(0.05 * std::cos(0.11 * double(i)));
  for (std::size_t i = 0; i < bias.size(); ++i) bias[i] = float(0.1 * std::sin(double(i)));
  const int c = 64, hw = 48, d = 64;
  std::vector<float> wa(std::size_t(4) * d * c), ba(static_cast<std::size_t>(d));
  for (std::size_t i = 0; i < wa.size(); ++i) wa[i] = float(0.12 * std::sin(0.7 * double(i)));
  for (std::size_t i = 0; i < ba.size(); ++i) ba[i] = float(0.05 * std::cos(double(i)));
  const std::size_t dc = std::size_t(d) * c;
  const cpu::AttentionWeights aw{wa.data(), ba.data(), wa.data() + dc, ba.data(), wa.data() + 2 * dc, ba.data(),
                                 wa.data() + 3 * dc, ba.data()};
  const auto xa = test_input(std::size_t(2) * c * hw);
  const auto ra = test_input(std::size_t(2) * c * hw + 7);
  std::vector<float> portable_conv, portable_attn, fma_conv, fma_attn;
  for (Isa isa : kLevels) {
    if (!cpu::isa_supported(isa) || isa > cpu::active_isa()) continue;  // DDIM_CPU_ISA caps the levels
    const cpu::KernelSpec& spec = cpu::kernel_spec(isa, cpu::GemmPrecision::Fp32);
    INFO("level ", std::string(cpu::to_string(isa)), ", kernel ", std::string(spec.name));
    cpu::PackedA packed;
    cpu::pack_conv_weights(s, w.data(), spec, packed, &pool);
    std::vector<float> y(out);
    cpu::ConvEpilogue e;
    e.bias = bias.data();
    cpu::conv2d_packed(s, x.data(), packed, e, y.data(), &pool);
    cpu::PackedAttention pa;
    cpu::pack_attention(aw, c, d, spec, pa, &pool);
    std::vector<float> scratch(cpu::attention_scratch_floats(2, c, hw, d, &pool)), ya(xa.size());
    cpu::attention_packed(xa.data(), ra.data() + 7, 2, c, hw, d, 2, 0.125f, pa, 1.0f, ya.data(), scratch.data(), &pool);
    if (isa == Isa::Portable) {
      portable_conv = y;
      portable_attn = ya;
    } else if (fma_conv.empty()) {
      fma_conv = y;
      fma_attn = ya;
    } else {
      CHECK(test::bitwise_equal(y, fma_conv));
      CHECK(test::bitwise_equal(ya, fma_attn));
    }
  }
  if (!portable_conv.empty() && !fma_conv.empty()) {
    CHECK(max_abs_diff(portable_conv, fma_conv) <= 1e-5 * max_abs(fma_conv));
    CHECK(max_abs_diff(portable_attn, fma_attn) <= 1e-5 * max_abs(fma_attn));
  }
}

TEST_CASE("cpu isa: the bundled model's forward and 50-step samples agree under every level up to the active one") {
  auto model = bundled_model();
  const int batch = 4;
  const auto x = test_input(std::size_t(batch) * 32 * 32);
  SampleOptions so;
  so.steps = 50;
  so.seed = 0;
  std::vector<float> fma_forward, fma_images, portable_forward, portable_images;
  const Isa top = cpu::active_isa();  // DDIM_CPU_ISA caps the levels compared
  for (Isa isa : kLevels) {
    if (!cpu::isa_supported(isa) || isa > top) continue;
    IsaEnv env(std::string(cpu::to_string(isa)));
    auto session = test::cpu_session(model, batch);
    const std::vector<float> f = session->forward(x, std::vector<int>{500});
    const std::vector<float> images = session->sample(so).images;
    if (isa == Isa::Portable) {
      portable_forward = f;
      portable_images = images;
    } else if (fma_forward.empty()) {
      fma_forward = f;
      fma_images = images;
    } else {
      INFO("level ", std::string(cpu::to_string(isa)));
      CHECK(test::bitwise_equal(f, fma_forward));
      CHECK(test::bitwise_equal(images, fma_images));
    }
  }
  if (!portable_forward.empty() && !fma_forward.empty()) {
    const double df = max_abs_diff(portable_forward, fma_forward) / max_abs(fma_forward);
    const double ds = max_abs_diff(portable_images, fma_images);
    MESSAGE("portable vs FMA levels: forward ", df, " of max |out|, 50-step sample max |diff| ", ds);
    CHECK(df <= 1e-5);
    CHECK(ds <= 1e-4);
  }
}
