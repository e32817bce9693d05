// CudnnConv (cuDNN backend graph, fused conv + bias + time-embedding add + residual add) and the
// conv_epilogue kernel against the CPU reference (ddim::cpu::conv2d, NCHW fp32) on the same
// rounded inputs, at U-Net shapes, in fp32, fp16 and bf16. Suite "gpu": needs a CUDA device.
//
// Tolerances (K = cin * kh * kw, the reduction length; u = the element type's unit roundoff;
// S_i = sum |x w| + |bias| + |temb| + |residual| of output element i, computed on the CPU):
//   * every type: |got - ref| <= (3u + (K + 3) 2^-23) S_i per element. The device sums the K
//     products and the up to 3 addends in fp32 (error <= gamma_{K+3} S_i with u32 = 2^-24; the
//     bound takes twice that for the CPU reference's own fp32 sums) and rounds to the element
//     type at most three times, each error <= u S_i: a fused engine may round the fp32 bias to
//     the element type, a partly fused plan rounds its output before the epilogue kernel adds
//     the rest, and the result is rounded. An engine that accumulated in fp16 (K u = 0.56 for
//     K = 1152) breaks it.
//   * fp32, additionally: ||got - ref|| / ||ref|| <= 1e-5 and max |got - ref| / max(|ref|,
//     1e-3 max|ref|) <= 2e-3. Two fp32 summation orders of K = 1152 differ by ~4e-7 normwise and
//     ~3e-4 at that floor (measured; so the floored bound cannot be 1e-4); TF32 gives ~3e-4
//     normwise and ~0.2 at the floor, 30x and 100x over.
// Every output is poisoned with NaN before the run (so an unwritten element fails) and checked for
// non-finite values; every device buffer has guard bytes that must be intact afterwards.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu/ops.hpp"
#include "cuda/cudnn_conv.hpp"
#include "ddim/error.hpp"
#include "gpu_util.hpp"

using namespace ddim;
using cuda::ConvEpilogue;
using cuda::ConvShape;
using cuda::CudnnConv;
using cuda::DType;
namespace g = ddim::test::gpu;

namespace {

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { GPU_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
};

ConvShape conv_shape(int n, int h, int w, int cin, int cout, int k, int stride, int pad_t, int pad_b, int pad_l, int pad_r) {
  return ConvShape{n, h, w, cin, cout, k, k, stride, stride, pad_t, pad_b, pad_l, pad_r};
}

ConvEpilogue epilogue(bool bias, bool temb, bool residual) {
  ConvEpilogue e;
  e.bias = bias;
  e.time_add = temb;
  e.residual_add = residual;
  return e;
}

// One problem in the CPU's layouts: x (n, cin, h, w), w (cout, cin, kh, kw), bias (cout) fp32,
// temb (n, cout), residual (n, cout, oh, ow); every value the device holds in type t is rounded
// to t here, so both sides start from the same numbers.
struct Problem {
  ConvShape s;
  DType t;
  ConvEpilogue e;
  int oh, ow;
  std::vector<float> x, w, bias, temb, residual;
};

Problem make_problem(const ConvShape& s, DType t, const ConvEpilogue& e, std::uint32_t seed) {
  Problem p{s, t, e, s.out_h(), s.out_w(), {}, {}, {}, {}, {}};
  const std::size_t K = std::size_t(s.cin) * s.kh * s.kw;
  const float ws = 1.f / std::sqrt(float(K));
  p.x = g::rounded(g::random_vector(std::size_t(s.n) * s.cin * s.h * s.w, seed, -1.f, 1.f), t);
  p.w = g::rounded(g::random_vector(std::size_t(s.cout) * K, seed + 1, -ws, ws), t);
  p.bias = g::random_vector(std::size_t(s.cout), seed + 2, -0.5f, 0.5f);
  p.temb = g::rounded(g::random_vector(std::size_t(s.n) * s.cout, seed + 3, -1.f, 1.f), t);
  p.residual = g::rounded(g::random_vector(std::size_t(s.n) * s.cout * p.oh * p.ow, seed + 4, -1.f, 1.f), t);
  return p;
}

cpu::Conv2dShape cpu_shape(const ConvShape& s) {
  return cpu::Conv2dShape{s.n, s.cin, s.h, s.w, s.cout, s.kh, s.kw, s.stride_h, s.stride_w, s.pad_t, s.pad_b, s.pad_l, s.pad_r};
}

// ref = conv(x, w) + bias + temb + residual (what the epilogue asks for), and S = the same with
// every term's absolute value (the scale of the rounding errors), both (n, cout, oh, ow).
void reference(const Problem& p, std::vector<float>& ref, std::vector<float>& scale) {
  const ConvShape& s = p.s;
  const cpu::Conv2dShape cs = cpu_shape(s);
  const std::size_t hw = std::size_t(p.oh) * p.ow, count = std::size_t(s.n) * s.cout * hw;
  ref.assign(count, 0.f);
  scale.assign(count, 0.f);
  cpu::conv2d(cs, p.x.data(), p.w.data(), p.e.bias ? p.bias.data() : nullptr, ref.data(), nullptr);
  auto absv = [](std::vector<float> v) {
    for (float& a : v) a = std::fabs(a);
    return v;
  };
  const std::vector<float> ax = absv(p.x), aw = absv(p.w), ab = absv(p.bias);
  cpu::conv2d(cs, ax.data(), aw.data(), p.e.bias ? ab.data() : nullptr, scale.data(), nullptr);
  for (int b = 0; b < s.n; ++b)
    for (int ch = 0; ch < s.cout; ++ch)
      for (std::size_t q = 0; q < hw; ++q) {
        const std::size_t i = (std::size_t(b) * s.cout + ch) * hw + q;
        if (p.e.time_add) {
          const float v = p.temb[std::size_t(b) * s.cout + ch];
          ref[i] += v;
          scale[i] += std::fabs(v);
        }
        if (p.e.residual_add) {
          ref[i] += p.residual[i];
          scale[i] += std::fabs(p.residual[i]);
        }
      }
}

// Runs the plan on device copies of the problem; returns y in NCHW. Checks guards.
std::vector<float> run_device(const CudnnConv& conv, cudnnHandle_t handle, const Problem& p, cudaStream_t stream) {
  const ConvShape& s = p.s;
  const int hw_in = s.h * s.w, hw_out = p.oh * p.ow;
  g::DevTensor x(g::nchw_to_nhwc(p.x, s.n, s.cin, hw_in), p.t);
  g::DevTensor w(g::nchw_to_nhwc(p.w, s.cout, s.cin, s.kh * s.kw), p.t);  // (cout, cin, kh*kw) -> KRSC
  g::DevTensor temb(p.temb, p.t);
  g::DevTensor residual(g::nchw_to_nhwc(p.residual, s.n, s.cout, hw_out), p.t);
  g::DevTensor y(std::size_t(s.n) * s.cout * hw_out, p.t);
  g::DevBytes bias(p.bias.size() * sizeof(float));
  bias.upload(p.bias.data());
  g::DevBytes workspace(std::max<std::size_t>(conv.workspace_bytes(), 16));
  y.mem.fill(0xFF);  // NaN in fp32, fp16 and bf16
  conv.run(handle, x.data(), w.data(), p.e.bias ? static_cast<const float*>(bias.data()) : nullptr,
           p.e.time_add ? temb.data() : nullptr, p.e.residual_add ? residual.data() : nullptr, y.data(),
           conv.workspace_bytes() ? workspace.data() : nullptr, stream);
  GPU_CHECK(cudaStreamSynchronize(stream));
  CHECK(y.mem.guards_intact());
  CHECK(x.mem.guards_intact());
  CHECK(w.mem.guards_intact());
  CHECK(temb.mem.guards_intact());
  CHECK(residual.mem.guards_intact());
  CHECK(bias.guards_intact());
  CHECK(workspace.guards_intact());
  return g::nhwc_to_nchw(y.read(), s.n, s.cout, hw_out);
}

// What the CUDA executor runs when cuDNN has no engine for a convolution: the direct kernel (with
// the bias), then the epilogue kernel for the time embedding and the residual; y in NCHW.
std::vector<float> run_direct(const Problem& p, cudaStream_t stream) {
  const ConvShape& s = p.s;
  const int hw_in = s.h * s.w, hw_out = p.oh * p.ow;
  g::DevTensor x(g::nchw_to_nhwc(p.x, s.n, s.cin, hw_in), p.t);
  g::DevTensor w(g::nchw_to_nhwc(p.w, s.cout, s.cin, s.kh * s.kw), p.t);
  g::DevTensor temb(p.temb, p.t);
  g::DevTensor residual(g::nchw_to_nhwc(p.residual, s.n, s.cout, hw_out), p.t);
  g::DevTensor y(std::size_t(s.n) * s.cout * hw_out, p.t);
  g::DevBytes bias(p.bias.size() * sizeof(float));
  bias.upload(p.bias.data());
  y.mem.fill(0xFF);
  cuda::conv2d_direct(s, x.data(), w.data(), p.e.bias ? static_cast<const float*>(bias.data()) : nullptr, y.data(), p.t, stream);
  cuda::conv_epilogue(y.data(), p.t, s.n, hw_out, s.cout, nullptr, p.e.time_add ? temb.data() : nullptr,
                      p.e.residual_add ? residual.data() : nullptr, stream);
  GPU_CHECK(cudaStreamSynchronize(stream));
  CHECK(y.mem.guards_intact());
  return g::nhwc_to_nchw(y.read(), s.n, s.cout, hw_out);
}

// Checks got against ref with the bounds stated at the top of the file.
void check_numbers(const Problem& p, const std::vector<float>& got, const std::vector<float>& ref,
                   const std::vector<float>& scale) {
  REQUIRE(got.size() == ref.size());
  double max_ref = 0, e2 = 0, r2 = 0, worst = 0;
  for (float v : ref) max_ref = std::max(max_ref, double(std::fabs(v)));
  const g::Diff d = g::compare(got, ref, 1e-3 * max_ref);
  const double K = double(p.s.cin) * p.s.kh * p.s.kw;
  const double factor = 3 * g::unit_roundoff(p.t) + (K + 3) * 0x1p-23;
  std::size_t over = 0, first_over = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) continue;  // counted by compare
    const double e = std::fabs(double(got[i]) - double(ref[i]));
    e2 += e * e;
    r2 += double(ref[i]) * ref[i];
    const double tol = factor * double(scale[i]) + 1e-30;
    worst = std::max(worst, e / tol);
    if (e > tol && over++ == 0) first_over = i;
  }
  const double norm_rel = std::sqrt(e2 / std::max(r2, 1e-300));
  MESSAGE(cuda::to_string(p.t) << ": max abs err " << d.max_abs << " (max |ref| " << max_ref << "), max rel (floor 1e-3 max) "
                               << d.max_rel << ", normwise " << norm_rel << ", worst err / per-element bound " << worst);
  CHECK(d.non_finite == 0);
  if (over) {
    MESSAGE("first element over the bound: index " << first_over << " got " << got[first_over] << " ref " << ref[first_over]
                                                   << " S " << scale[first_over]);
  }
  CHECK(over == 0);
  if (p.t == DType::F32) {
    CHECK(norm_rel <= 1e-5);
    CHECK(d.max_rel <= 2e-3);
  }
}

struct Case {
  const char* name;
  ConvShape shape;
  ConvEpilogue epilogue;
  bool may_be_unsupported;  // cuDNN may have no engine (the caller then uses conv2d_direct)
};

std::vector<Case> unet_cases() {
  return {
      {"3x3 128->256 16x16 pad 1 + bias", conv_shape(2, 16, 16, 128, 256, 3, 1, 1, 1, 1, 1), epilogue(true, false, false), false},
      {"3x3 128->256 16x16 pad 1 + bias + temb", conv_shape(2, 16, 16, 128, 256, 3, 1, 1, 1, 1, 1), epilogue(true, true, false),
       false},
      {"3x3 128->256 16x16 pad 1 + bias + temb + residual", conv_shape(2, 16, 16, 128, 256, 3, 1, 1, 1, 1, 1),
       epilogue(true, true, true), false},
      {"3x3 stride 2 128->128 16x16 pad 1 (downsample) + bias", conv_shape(2, 16, 16, 128, 128, 3, 2, 1, 1, 1, 1),
       epilogue(true, false, false), false},
      {"3x3 stride 2 128->128 16x16 pad (0,1,0,1) (DDPM downsample) + bias", conv_shape(2, 16, 16, 128, 128, 3, 2, 0, 1, 0, 1),
       epilogue(true, false, false), true},
      {"1x1 128->256 16x16 (shortcut) + bias + residual", conv_shape(2, 16, 16, 128, 256, 1, 1, 0, 0, 0, 0),
       epilogue(true, false, true), false},
      {"3x3 64->64 8x8 pad 1, no bias, + temb", conv_shape(2, 8, 8, 64, 64, 3, 1, 1, 1, 1, 1), epilogue(false, true, false),
       false},
  };
}

void run_case(cudnnHandle_t handle, cudaStream_t stream, const Case& c, DType t, bool autotune, std::uint32_t seed) {
  CAPTURE(c.name);
  CAPTURE(cuda::to_string(t));
  const Problem p = make_problem(c.shape, t, c.epilogue, seed);
  std::unique_ptr<CudnnConv> conv;
  try {
    conv = std::make_unique<CudnnConv>(handle, c.shape, t, c.epilogue, autotune);
  } catch (const Error& e) {
    MESSAGE(c.name << " " << cuda::to_string(t) << ": " << to_string(e.code()) << ": " << e.what());
    CHECK(e.code() == ErrorCode::Unsupported);
    CHECK(std::string(e.what()).find(cuda::describe(c.shape, t, c.epilogue)) != std::string::npos);  // names the shape
    if (!c.may_be_unsupported) FAIL_CHECK("cuDNN has no engine for " << c.name << " in " << cuda::to_string(t));
    // The executor then runs the direct kernel: check what it computes instead.
    std::vector<float> ref, scale;
    reference(p, ref, scale);
    check_numbers(p, run_direct(p, stream), ref, scale);
    return;
  }
  MESSAGE(c.name << " " << cuda::to_string(t) << ": fused " << conv->fused() << " (" << conv->fused_adds()
                 << " adds in cuDNN), " << conv->engine_description());
  CHECK(!conv->engine_description().empty());
  CHECK(conv->fused_adds() <= int(c.epilogue.bias) + int(c.epilogue.time_add) + int(c.epilogue.residual_add));
  std::vector<float> ref, scale;
  reference(p, ref, scale);
  const std::vector<float> got = run_device(*conv, handle, p, stream);
  check_numbers(p, got, ref, scale);
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cudnn conv: U-Net shapes and epilogues match the CPU in fp32, fp16 and bf16 [cudnn]") {
    cuda::CudnnHandle handle;
    Stream stream;
    std::uint32_t seed = 100;
    for (DType t : {DType::F32, DType::F16, DType::BF16})
      for (const Case& c : unet_cases()) run_case(handle.get(), stream.s, c, t, /*autotune=*/false, seed += 10);
  }

  TEST_CASE("cudnn conv: an autotuned plan matches the CPU too [cudnn]") {
    cuda::CudnnHandle handle;
    Stream stream;
    const Case c{"3x3 128->256 16x16 pad 1 + bias + temb + residual (autotuned)", conv_shape(2, 16, 16, 128, 256, 3, 1, 1, 1, 1, 1),
                 epilogue(true, true, true), false};
    for (DType t : {DType::F32, DType::F16}) run_case(handle.get(), stream.s, c, t, /*autotune=*/true, 7);
  }

  TEST_CASE("cudnn conv: the device's plan cache builds each key once and serves every session [cudnn]") {
    int device = 0;
    GPU_CHECK(cudaGetDevice(&device));
    const auto cache = cuda::ConvPlanCache::for_device(device);
    CHECK(cache->shared());
    CHECK(cuda::ConvPlanCache::for_device(device) == cache);  // one per device and process
    const ConvShape s = conv_shape(1, 8, 8, 64, 64, 3, 1, 1, 1, 1, 1);
    const std::size_t before = cache->size();
    const auto a = cache->get(s, DType::F16, epilogue(true, false, false));
    const auto b = cache->get(s, DType::F16, epilogue(true, false, false));
    const auto c = cache->get(s, DType::F16, epilogue(true, true, false));
    CHECK(a == b);
    CHECK(a != c);
    CHECK(cache->size() <= before + 2);
    CHECK(cache->max_workspace_bytes() >= std::max(a->workspace_bytes(), c->workspace_bytes()));
    CHECK(a->shape().cin == 64);
    CHECK(a->dtype() == DType::F16);
    CHECK(c->epilogue().time_add);
    // A private cache (what DDIM_CUDNN_PLAN_CACHE=0 gives every session) plans on its own.
    cuda::ConvPlanCache own(device);
    CHECK(!own.shared());
    CHECK(own.get(s, DType::F16, epilogue(true, false, false)) != a);
    CHECK(own.size() == 1);
    // A plan from the cache runs with another handle (a session's) and matches the CPU.
    cuda::CudnnHandle handle;
    Stream stream;
    const Problem p = make_problem(s, DType::F16, epilogue(true, true, false), 3);
    std::vector<float> ref, scale;
    reference(p, ref, scale);
    check_numbers(p, run_device(*c, handle.get(), p, stream.s), ref, scale);
  }

  TEST_CASE("cudnn conv: bad shapes and bad arguments are InvalidArgument errors naming the convolution [cudnn]") {
    cuda::CudnnHandle handle;
    Stream stream;
    // A kernel larger than the padded input.
    const ConvShape bad = conv_shape(1, 2, 2, 8, 8, 5, 1, 0, 0, 0, 0);
    try {
      CudnnConv conv(handle.get(), bad, DType::F16, epilogue(true, false, false));
      FAIL_CHECK("no error for a 5x5 kernel on a 2x2 input");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidArgument);
      CHECK(std::string(e.what()).find("conv 5x5") != std::string::npos);
    }
    const ConvShape s = conv_shape(1, 8, 8, 64, 64, 3, 1, 1, 1, 1, 1);
    CudnnConv conv(handle.get(), s, DType::F16, epilogue(true, true, false));
    g::DevBytes x(8 * 8 * 64 * 2), w(64 * 9 * 64 * 2), y(8 * 8 * 64 * 2), bias(64 * 4), temb(64 * 2),
        ws(std::max<std::size_t>(conv.workspace_bytes(), 16));
    void* wsp = conv.workspace_bytes() ? ws.data() : nullptr;
    auto expect_invalid = [&](const char* what, auto&& call) {
      CAPTURE(what);
      try {
        call();
        FAIL_CHECK("no error");
      } catch (const Error& e) {
        CHECK(e.code() == ErrorCode::InvalidArgument);
        CHECK(std::string(e.what()).find(cuda::describe(s, DType::F16, conv.epilogue())) != std::string::npos);
      }
    };
    expect_invalid("null bias", [&] {
      conv.run(handle.get(), x.data(), w.data(), nullptr, temb.data(), nullptr, y.data(), wsp, stream.s);
    });
    expect_invalid("null temb", [&] {
      conv.run(handle.get(), x.data(), w.data(), static_cast<const float*>(bias.data()), nullptr, nullptr, y.data(), wsp,
               stream.s);
    });
    expect_invalid("misaligned x", [&] {
      conv.run(handle.get(), static_cast<const char*>(x.data()) + 2, w.data(), static_cast<const float*>(bias.data()),
               temb.data(), nullptr, y.data(), wsp, stream.s);
    });
    expect_invalid("y == x", [&] {
      conv.run(handle.get(), x.data(), w.data(), static_cast<const float*>(bias.data()), temb.data(), nullptr, x.data(), wsp,
               stream.s);
    });
    // The parts the epilogue does not use are ignored (null or not).
    x.fill(0);
    w.fill(0);
    conv.run(handle.get(), x.data(), w.data(), static_cast<const float*>(bias.data()), temb.data(), y.data(), y.data(), wsp,
             stream.s);
    GPU_CHECK(cudaStreamSynchronize(stream.s));
    CHECK(y.guards_intact());
  }

  TEST_CASE("conv_epilogue kernel: y + bias + temb + residual in fp32, rounded once, bitwise as the host computes it") {
    Stream stream;
    const int n = 2, hw = 37, k = 96;
    const std::size_t count = std::size_t(n) * hw * k;
    for (DType t : {DType::F32, DType::F16, DType::BF16})
      for (int mask = 1; mask < 8; ++mask) {  // which of bias / temb / residual are present
        CAPTURE(cuda::to_string(t));
        CAPTURE(mask);
        const bool use_bias = mask & 1, use_temb = mask & 2, use_residual = mask & 4;
        const auto y0 = g::rounded(g::random_vector(count, 11, -2.f, 2.f), t);
        const auto bias = g::random_vector(std::size_t(k), 12, -1.f, 1.f);
        const auto temb = g::rounded(g::random_vector(std::size_t(n) * k, 13, -1.f, 1.f), t);
        const auto residual = g::rounded(g::random_vector(count, 14, -1.f, 1.f), t);
        g::DevTensor dy(y0, t), dtemb(temb, t), dres(residual, t);
        g::DevBytes dbias(bias.size() * 4);
        dbias.upload(bias.data());
        cuda::conv_epilogue(dy.data(), t, n, hw, k, use_bias ? static_cast<const float*>(dbias.data()) : nullptr,
                            use_temb ? dtemb.data() : nullptr, use_residual ? dres.data() : nullptr, stream.s);
        GPU_CHECK(cudaStreamSynchronize(stream.s));
        std::vector<float> ref(count);
        for (std::size_t i = 0; i < count; ++i) {
          const std::size_t ch = i % std::size_t(k), b = i / (std::size_t(hw) * k);
          float v = y0[i];
          if (use_bias) v += bias[ch];
          if (use_temb) v += temb[b * std::size_t(k) + ch];
          if (use_residual) v += residual[i];
          ref[i] = v;
        }
        const auto want = g::rounded(ref, t), got = dy.read();
        std::size_t differ = 0;
        for (std::size_t i = 0; i < count; ++i) differ += !(got[i] == want[i]);
        CHECK(differ == 0);
        CHECK(dy.mem.guards_intact());
      }
  }
}
