// The CUDA vector_quantize kernel against the CPU op (tests/cpp/test_latent.cpp checks the CPU op
// against a double-precision search): the same indices and the same entries, bitwise, for every
// element type (the input rounded to the type first, the same rounded values given to the CPU),
// exact ties to the lowest index, in place, and the argument checks. Then a latent model's session
// on the device: its decoder (conv, group_norm, the one-head attention, the quantisation) and the
// latent loop against the CPU session's.
#include <cuda_runtime_api.h>
#include <doctest/doctest.h>

#include <vector>

#include "../cpp/test_util.hpp"
#include "cpu/ops.hpp"
#include "ddim/ddim.hpp"
#include "cuda/kernels.hpp"
#include "ddim/error.hpp"
#include "gpu_util.hpp"

using namespace ddim;
using cuda::DType;
namespace g = ddim::test::gpu;

TEST_SUITE("gpu") {
  TEST_CASE("cuda kernels: vector_quantize picks the CPU's entries (ties to the lowest index), every type, in place") {
    const int n = 2, c = 3, h = 7, w = 9, hw = h * w, K = 96;
    std::vector<float> cb = g::random_vector(std::size_t(K) * c, 5, -2.f, 2.f);
    for (int ch = 0; ch < c; ++ch) cb[std::size_t(70) * c + ch] = cb[std::size_t(9) * c + ch];  // 70 duplicates 9
    g::DevBytes dcb(cb.size() * sizeof(float));
    dcb.upload(cb.data());
    for (DType t : {DType::F32, DType::F16, DType::BF16}) {
      CAPTURE(int(t));
      std::vector<float> x = g::random_vector(std::size_t(n) * c * hw, 6, -2.f, 2.f);
      for (int ch = 0; ch < c; ++ch) x[std::size_t(ch) * hw + 4] = cb[std::size_t(9) * c + ch];  // on the tie
      x = g::rounded(x, t);
      std::vector<float> ref(x.size());
      std::vector<int> ref_idx(std::size_t(n) * hw);
      cpu::vector_quantize(x.data(), n, c, hw, cb.data(), K, ref.data(), ref_idx.data());
      g::DevTensor dx(g::nchw_to_nhwc(x, n, c, hw), t), dy(x.size(), t);
      dy.mem.fill(0xFF);
      g::DevBytes didx(ref_idx.size() * sizeof(int));
      cuda::vector_quantize(dx.data(), dy.data(), static_cast<int*>(didx.data()), t, n, hw, c,
                            static_cast<const float*>(dcb.data()), K, nullptr);
      g::sync();
      std::vector<int> idx(ref_idx.size());
      didx.download(idx.data());
      CHECK(idx == ref_idx);
      CHECK(ref_idx[4] == 9);
      CHECK(g::nhwc_to_nchw(dy.read(), n, c, hw) == g::rounded(ref, t));
      // In place: y == x.
      cuda::vector_quantize(dx.data(), dx.data(), nullptr, t, n, hw, c, static_cast<const float*>(dcb.data()), K, nullptr);
      g::sync();
      CHECK(g::nhwc_to_nchw(dx.read(), n, c, hw) == g::rounded(ref, t));
      CHECK(dx.mem.guards_intact());
      CHECK(dy.mem.guards_intact());
      CHECK(didx.guards_intact());
    }
    CHECK_THROWS_AS(cuda::vector_quantize(dcb.data(), dcb.data(), nullptr, DType::F32, 1, 1, cuda::kMaxVqChannels + 1,
                                          static_cast<const float*>(dcb.data()), 1, nullptr),
                    Error);
    CHECK_THROWS_AS(cuda::vector_quantize(dcb.data(), dcb.data(), nullptr, DType::F32, 1, 1, 3, nullptr, 4, nullptr), Error);
    CHECK_NOTHROW(cuda::vector_quantize(nullptr, nullptr, nullptr, DType::F32, 0, 5, 3, nullptr, 4, nullptr));
  }

  TEST_CASE("cuda: a latent model's session (fp32) decodes and samples like the CPU's (vq and kl decoders)") {
    for (const std::string kind : {"vq", "kl"}) {
      CAPTURE(kind);
      const auto model = test::latent_model(kind);
      SessionOptions o;
      o.batch = 2;
      o.precision = Precision::FP32;
      o.backend = BackendKind::Cuda;
      const auto gpu = Session::create(model, o);
      o.backend = BackendKind::Cpu;
      const auto cpu = Session::create(model, o);
      CHECK(gpu->plan_info().decoder.find("cuda") != std::string::npos);
      const auto latents = g::random_vector(std::size_t(2) * 4 * 8 * 6, 11, -1.f, 1.f);
      const auto ref = cpu->decode(latents), got = gpu->decode(latents);
      double scale = 0;
      for (float v : ref) scale = std::max(scale, double(std::fabs(v)));
      const auto d = g::compare(got, ref, 1e-4 * scale);
      MESSAGE(kind << " decode fp32 max abs diff " << d.max_abs << " (max |ref| " << scale << ")");
      CHECK(d.non_finite == 0);
      CHECK(d.max_abs <= 1e-4 * scale);
      SampleOptions so;
      so.steps = 3;
      so.seed = 2;
      const SampleResult a = cpu->sample(so), b = gpu->sample(so);
      CHECK(b.c == 3);
      CHECK(b.h == 16);
      const auto ds = g::compare(b.images, a.images, 1e-3);
      MESSAGE(kind << " sample fp32 max abs diff " << ds.max_abs);
      CHECK(ds.max_abs <= 1e-3);
    }
  }
}
