// The CUDA backend as a whole (suite "gpu"): sessions on the GPU against the CPU reference,
// determinism (repeated runs, graph replay vs eager), the per-step kernels bitwise equal to the
// host's shared math, batch independence, errors. Needs a CUDA device; see tests/cpp/main.cpp.
// Under the CUDA emulator (gpu_emu) the "small" U-Net is smaller and samples take fewer steps
// (g::on_gpu_or_emulated): the same code paths at a cost the CPU affords.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <functional>
#include <thread>
#include <string>
#include <vector>

#include "../cpp/test_util.hpp"
#include "cuda/kernels.hpp"
#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"
#include "gpu_util.hpp"
#include "kernels/philox.h"
#include "sampler/noise.hpp"
#include "schedule/ddim_params.hpp"
#include "kernels/ddim_step.h"

using namespace ddim;
namespace g = ddim::test::gpu;
using cuda::DType;

namespace {

std::unique_ptr<Session> cuda_session(std::shared_ptr<const Model> model, int batch, Precision p = Precision::FP32,
                                      bool profile = false, bool whole_loop = false) {
  SessionOptions o;
  o.backend = BackendKind::Cuda;
  o.batch = batch;
  o.precision = p;
  o.profile = profile;
  o.whole_loop_graph = whole_loop;
  return Session::create(std::move(model), o);
}

using test::bitwise_equal;

double max_abs(std::span<const float> a) {
  double m = 0;
  for (float v : a) m = std::max(m, double(std::fabs(v)));
  return m;
}

// A smaller model of the cifar10-32 kind: 32x32, 3 levels with attention at 16x16, 32 groups.
// Emulated: 16x8 (not square), 32 channels in groups of 4, attention at 8x4 as 2 heads of 16.
std::shared_ptr<const Model> small_unet_model(ScheduleConfig schedule = {}) {
  graph::UNetConfig c;
  c.block_out_channels = g::on_gpu_or_emulated(std::vector<int>{64, 128, 128}, std::vector<int>{32, 32, 32});
  c.down_attention = {false, true, false};
  c.layers_per_block = 1;
  c.attention_head_dim = g::on_gpu_or_emulated(32, 16);
  c.norm_num_groups = g::on_gpu_or_emulated(32, 8);
  c.sample_height = g::on_gpu_or_emulated(32, 16);
  c.sample_width = g::on_gpu_or_emulated(32, 8);
  return Model::load_from_memory(graph::make_random_model_file(c, schedule, 11), "small");
}

// The session's warnings about CUDA graphs (a capture that failed and fell back to eager steps).
// (Under the emulator every session also warns that cuDNN is not used.)
std::vector<std::string> graph_warnings(const Session& s) {
  std::vector<std::string> w;
  for (const std::string& text : s.plan_info().warnings)
    if (text.find("CUDA graph") != std::string::npos) w.push_back(text);
  return w;
}

std::shared_ptr<const Model> preset_model(const graph::UNetConfig& c) {
  return Model::load_from_memory(graph::make_random_model_file(c, ScheduleConfig{}, 0), "preset");
}

// Compares every node the GPU session reports with the CPU's (same inputs), each against its own
// largest magnitude; names the first node whose relative difference is above `bound`.
void compare_dumps(std::shared_ptr<const Model> model, Precision p, double bound) {
  const int n = 2;
  const std::size_t E = std::size_t(model->info().in_channels) * model->info().height * model->info().width;
  const auto x = g::random_vector(n * E, 21, -1.f, 1.f);
  const std::vector<int> t{640, 3};
  std::map<std::string, std::vector<float>> cpu_values;
  test::cpu_session(model, n)->forward(x, t, [&](const std::string& name, const std::vector<std::int64_t>&,
                                                 std::span<const float> v) { cpu_values[name].assign(v.begin(), v.end()); });
  int compared = 0;
  std::string first_bad;
  double worst = 0;
  auto gpu = cuda_session(model, n, p);
  const auto out = gpu->forward(x, t, [&](const std::string& name, const std::vector<std::int64_t>& shape,
                                          std::span<const float> v) {
    const auto it = cpu_values.find(name);
    REQUIRE_MESSAGE(it != cpu_values.end(), name);
    REQUIRE(it->second.size() == v.size());
    std::int64_t count = 1;
    for (auto d : shape) count *= d;
    CHECK(std::size_t(count) == v.size());
    const auto d = g::compare(std::vector<float>(v.begin(), v.end()), it->second);
    const double rel = d.max_abs / std::max(max_abs(it->second), 1e-6);
    worst = std::max(worst, rel);
    if ((rel > bound || d.non_finite) && first_bad.empty()) first_bad = name;
    ++compared;
  });
  MESSAGE("per-node dumps " << to_string(p) << ": " << compared << " nodes compared, worst relative diff " << worst
                            << (first_bad.empty() ? "" : ", first above the bound: " + first_bad));
  CHECK(first_bad.empty());
  CHECK(compared > 20);
  CHECK(out.size() == std::size_t(n) * E);
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cuda: Philox initial noise on the device equals the host's bitwise") {
    const int n = 3, c = 3, hw = 32 * 32 + 5;  // a count that is not a multiple of 4 per sample
    std::vector<std::uint64_t> seeds{0, 7, 0xFFFFFFFFFFull};
    g::DevBytes d_seeds(seeds.size() * 8), d_x(std::size_t(n) * c * hw * 4);
    d_seeds.upload(seeds.data());
    cuda::philox_initial(static_cast<const std::uint64_t*>(d_seeds.data()), n, c, hw, static_cast<float*>(d_x.data()), nullptr);
    g::sync();
    std::vector<float> nhwc(std::size_t(n) * c * hw);
    d_x.download(nhwc.data());
    const std::vector<float> got = g::nhwc_to_nchw(nhwc, n, c, hw);
    for (int b = 0; b < n; ++b) {
      std::vector<float> ref(std::size_t(c) * hw);
      fill_normal(seeds[std::size_t(b)], kNoiseStreamInitial, 0, ref);
      CHECK(bitwise_equal(std::span(got).subspan(std::size_t(b) * c * hw, std::size_t(c) * hw), ref));
    }
    CHECK(d_x.guards_intact());
  }

  TEST_CASE("cuda: the step kernel equals the host's DDIM and DDPM steps bitwise, noise included") {
    // fp32 model output, so both sides compute from identical floats with the same rounded
    // operations (kernels/hd.h): the results must agree to the bit.
    const int n = 2, c = 3, hw = 64;
    const std::size_t NE = std::size_t(n) * c * hw;
    const auto x = g::random_vector(NE, 1, -2.f, 2.f), out = g::random_vector(NE, 2, -2.f, 2.f);
    std::vector<DdimStepParams> steps(3);
    steps[0] = {0.3f, 0.95393920f, 0.5f, 0.7f, 0.2f, 1.f, kPredEpsilon, kClipRange, 0, 900, kUpdateDdim};
    steps[1] = {0.8f, 0.6f, 0.9f, 0.3f, 0.25f, 1.f, kPredV, kClipNone, 1, 500, kUpdateDdim};
    steps[2] = {0.9f, 0.43588989f, 0.95f, 0.f, 0.05f, 1.f, kPredEpsilon, kClipRange, 0, 10, kUpdateDdpm, 0.4f, 0.55f};
    const std::vector<std::uint64_t> seeds{5, 6};
    for (int step = 0; step < 3; ++step) {
      CAPTURE(step);
      g::DevBytes d_params(steps.size() * sizeof(DdimStepParams)), d_index(4), d_seeds(16), d_x(NE * 4), d_out(NE * 4),
          d_x0(3 * NE * 4);
      d_params.upload(steps.data());
      d_index.upload(&step);
      d_seeds.upload(seeds.data());
      d_x.upload(g::nchw_to_nhwc(x, n, c, hw).data());
      d_out.upload(g::nchw_to_nhwc(out, n, c, hw).data());
      cuda::StepLaunch s{n, c, hw, static_cast<const DdimStepParams*>(d_params.data()), static_cast<const int*>(d_index.data()),
                         static_cast<const std::uint64_t*>(d_seeds.data()), nullptr, static_cast<float*>(d_x.data()),
                         d_out.data(), static_cast<float*>(d_x0.data()), nullptr, nullptr, nullptr};
      cuda::ddim_step(s, cuda::DType::F32, nullptr);
      g::sync();
      std::vector<float> got(NE), x0_all(3 * NE);
      d_x.download(got.data());
      d_x0.download(x0_all.data());
      for (int b = 0; b < n; ++b) {
        const std::size_t E = std::size_t(c) * hw;
        std::vector<float> z(E), x0(E), prev(E);
        fill_normal(seeds[std::size_t(b)], kNoiseStreamStep, std::uint32_t(step), z);
        ddim_step_sample(steps[std::size_t(step)], std::span(x).subspan(b * E, E), std::span(out).subspan(b * E, E), z, x0, prev,
                         0.995, 1.0);
        const auto got_b = g::nhwc_to_nchw(got, n, c, hw);
        CHECK(bitwise_equal(std::span(got_b).subspan(b * E, E), prev));
        const std::vector<float> slice(x0_all.begin() + std::ptrdiff_t(step * NE), x0_all.begin() + std::ptrdiff_t((step + 1) * NE));
        const auto x0_b = g::nhwc_to_nchw(slice, n, c, hw);
        CHECK(bitwise_equal(std::span(x0_b).subspan(b * E, E), x0));
      }
      CHECK(d_x.guards_intact());
      CHECK(d_x0.guards_intact());
    }
  }

  TEST_CASE("cuda: forward fp32 equals the CPU backend (tiny and a 3-level 32x32 U-Net)") {
    // Bound: 1e-4 of the output's largest magnitude, fp32 without TF32 (cuDNN engines that
    // down-convert are excluded, cuBLAS runs pedantic fp32), after ~20 layers of reductions in a
    // different order than the CPU's.
    for (auto model : {test::tiny_model(), small_unet_model()}) {
      CAPTURE(model->info().height);
      const int n = 2;
      auto cpu = test::cpu_session(model, n);
      auto gpu = cuda_session(model, n);
      const std::size_t E = std::size_t(model->info().in_channels) * model->info().height * model->info().width;
      const auto x = g::random_vector(n * E, 3, -1.5f, 1.5f);
      const std::vector<int> t{999, 37};
      const auto ref = cpu->forward(x, t), got = gpu->forward(x, t);
      const auto d = g::compare(got, ref, 1e-4 * max_abs(ref));
      MESSAGE("forward fp32 max abs diff " << d.max_abs << " (max |ref| " << max_abs(ref) << ")");
      CHECK(d.non_finite == 0);
      CHECK(d.max_abs <= 1e-4 * max_abs(ref));
    }
  }

  TEST_CASE("cuda: per-node dumps on the GPU (fp32 and fp16) follow the CPU's, node by node") {
    // Localises a wrong kernel: the first node whose output leaves 1e-4 (fp32) or 1e-2 (fp16) of
    // its own largest magnitude is named. Fused convolutions report under their add's name (the
    // conv's own output never exists on the GPU).
    compare_dumps(small_unet_model(), Precision::FP32, 1e-4);
    compare_dumps(small_unet_model(), Precision::FP16, 1e-2);
  }

  TEST_CASE("cuda: forward in fp16 and bf16 stays close to the CPU's at several timesteps") {
    // Bounds (max abs difference over the output, relative to its largest magnitude): fp16 1e-2,
    // bf16 4e-2 (bf16 keeps 8 bits of mantissa against fp16's 11: 8x the rounding of every
    // activation and weight, through ~20 layers).
    auto model = small_unet_model();
    const int n = 2;
    const std::size_t E = std::size_t(model->info().in_channels) * model->info().height * model->info().width;
    auto cpu = test::cpu_session(model, n);
    for (Precision p : {Precision::FP16, Precision::BF16}) {
      auto gpu = cuda_session(model, n, p);
      const double bound = p == Precision::FP16 ? 1e-2 : 4e-2;
      for (const std::vector<int>& t : {std::vector<int>{999, 990}, std::vector<int>{500, 250}, std::vector<int>{10, 0}}) {
        CAPTURE(to_string(p));
        CAPTURE(t[0]);
        const auto x = g::random_vector(n * E, 40 + std::uint32_t(t[0]), -1.5f, 1.5f);
        const auto ref = cpu->forward(x, t), got = gpu->forward(x, t);
        const auto d = g::compare(got, ref);
        MESSAGE(to_string(p) << " forward at t = " << t[0] << "," << t[1] << ": max abs diff " << d.max_abs << " = "
                             << d.max_abs / max_abs(ref) << " of max |ref|");
        CHECK(d.non_finite == 0);
        CHECK(d.max_abs <= bound * max_abs(ref));
      }
    }
  }

  TEST_CASE("cuda: a 50-step sample, fp32 on the GPU vs the CPU, same seed (clip_sample on and off)") {
    // Measured bound to be stated in the gpu-check report; the check here is 1e-3 of the samples'
    // magnitude (at least 1: clip_sample on keeps x0 in [-1, 1]). Without clipping a wiring
    // error cannot hide behind the clamp.
    const int steps = g::on_gpu_or_emulated(50, 8);
    for (bool clip : {true, false}) {
      CAPTURE(clip);
      ScheduleConfig schedule;
      schedule.clip_sample = clip;
      auto model = small_unet_model(schedule);
      auto cpu = test::cpu_session(model, 2);
      auto gpu = cuda_session(model, 2);
      SampleOptions o;
      o.steps = steps;
      o.seed = 42;
      const auto ref = cpu->sample(o), got = gpu->sample(o);
      const auto d = g::compare(got.images, ref.images);
      const double scale = std::max(1.0, max_abs(ref.images));
      MESSAGE(steps << "-step sample (clip_sample " << (clip ? "on" : "off") << "), GPU fp32 vs CPU: max abs diff "
                    << d.max_abs << " (max |ref| " << max_abs(ref.images) << ")");
      CHECK(d.non_finite == 0);
      CHECK(d.max_abs <= 1e-3 * scale);
    }
  }

  TEST_CASE("cuda: sampling is bitwise deterministic, graph replay equals eager steps") {
    for (Precision p : {Precision::FP32, Precision::FP16, Precision::BF16}) {
      CAPTURE(to_string(p));
      auto model = small_unet_model();
      auto graphed = cuda_session(model, 2, p);
      auto eager = cuda_session(model, 2, p, /*profile=*/true);
      auto loop = cuda_session(model, 2, p, /*profile=*/false, /*whole_loop=*/true);
      SampleOptions o;
      o.steps = g::on_gpu_or_emulated(20, 2);
      o.eta = 0.5;  // per-step noise on the device too
      o.seed = 9;
      const auto a = graphed->sample(o), b = graphed->sample(o), c = eager->sample(o);
      const auto d = loop->sample(o), e = loop->sample(o);
      CHECK(bitwise_equal(a.images, d.images));
      CHECK(bitwise_equal(d.images, e.images));
      CHECK(graph_warnings(*loop).empty());
      // The graphed session really replayed a graph (no capture failure fell back to eager).
      for (const auto& w : graphed->plan_info().warnings) MESSAGE(w);
      CHECK(graph_warnings(*graphed).empty());
      CHECK(bitwise_equal(a.images, b.images));
      CHECK(bitwise_equal(a.images, c.images));
      CHECK(std::all_of(a.images.begin(), a.images.end(), [](float v) { return std::isfinite(v); }));
    }
  }

  TEST_CASE("cuda: fp16 and bf16 samples stay close to fp32") {
    // Loose bounds (the trajectory amplifies rounding over 50 steps): mean abs difference to the
    // fp32 sample below 0.05 (fp16) and 0.1 (bf16) on values in [-1, 1]; the measured values are
    // printed for the report.
    auto model = small_unet_model();
    SampleOptions o;
    o.steps = g::on_gpu_or_emulated(50, 4);
    o.seed = 3;
    const auto ref = cuda_session(model, 2)->sample(o);
    for (Precision p : {Precision::FP16, Precision::BF16}) {
      const auto got = cuda_session(model, 2, p)->sample(o);
      double sum = 0;
      for (std::size_t i = 0; i < ref.images.size(); ++i) sum += std::fabs(double(got.images[i]) - ref.images[i]);
      const double mean = sum / double(ref.images.size());
      MESSAGE(to_string(p) << " vs fp32, " << o.steps << " steps: mean abs diff " << mean);
      CHECK(mean < (p == Precision::FP16 ? 0.05 : 0.1));
    }
  }

  TEST_CASE("cuda: a sample inside a batch equals the same sample alone") {
    // Same seed -> same x_T and noise; only the batch size differs, which may change cuDNN's and
    // cuBLAS's algorithms: fp32 within 1e-4 absolute.
    auto model = small_unet_model();
    SampleOptions o;
    o.steps = g::on_gpu_or_emulated(10, 3);
    o.seed = 100;
    const auto batch = cuda_session(model, 4)->sample(o);
    o.seed = 102;
    const auto alone = cuda_session(model, 1)->sample(o);
    const std::size_t E = alone.images.size();
    const std::vector<float> third(batch.images.begin() + std::ptrdiff_t(2 * E), batch.images.begin() + std::ptrdiff_t(3 * E));
    const auto d = g::compare(third, alone.images);
    MESSAGE("batch vs alone max abs diff " << d.max_abs);
    CHECK(d.max_abs <= 1e-4);
  }

  TEST_CASE("cuda: trajectory, x0 predictions and progress on the device path") {
    auto model = test::tiny_model();
    auto gpu = cuda_session(model, 2);
    auto cpu = test::cpu_session(model, 2);
    SampleOptions o;
    o.steps = 5;
    o.want_trajectory = true;
    o.want_x0 = true;
    std::vector<int> seen;
    o.progress = [&](int done, int) {
      seen.push_back(done);
      return true;
    };
    const auto got = gpu->sample(o);
    CHECK(seen == std::vector<int>{1, 2, 3, 4, 5});
    o.progress = {};
    const auto ref = cpu->sample(o);
    REQUIRE(got.trajectory.size() == ref.trajectory.size());
    REQUIRE(got.x0.size() == ref.x0.size());
    CHECK(g::compare(got.trajectory, ref.trajectory).max_abs <= 1e-3);
    CHECK(g::compare(got.x0, ref.x0).max_abs <= 1e-3);
    o.progress = [](int done, int) { return done < 3; };
    try {
      gpu->sample(o);
      FAIL("expected a cancellation");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::Cancelled);
    }
    // The session still works after a cancellation.
    o.progress = {};
    CHECK(bitwise_equal(gpu->sample(o).images, got.images));
  }

  TEST_CASE("cuda: dynamic thresholding on the GPU matches the CPU") {
    // The bound of each sample is a quantile of |x0| (cuda/threshold.hpp, bitwise the host's on
    // the same x0); the x0 themselves differ by the forward's rounding, so: within 1e-3.
    ScheduleConfig schedule;
    schedule.thresholding = true;
    schedule.dynamic_thresholding_ratio = 0.9;
    schedule.sample_max_value = 1.5;
    auto model = test::tiny_model(4, schedule);
    SampleOptions o;
    o.steps = g::on_gpu_or_emulated(10, 4);
    o.seed = 8;
    const auto ref = test::cpu_session(model, 2)->sample(o);
    const auto got = cuda_session(model, 2)->sample(o);
    const auto d = g::compare(got.images, ref.images);
    MESSAGE("thresholded " << o.steps << "-step sample, GPU fp32 vs CPU: max abs diff " << d.max_abs);
    CHECK(d.non_finite == 0);
    CHECK(d.max_abs <= 1e-3);
  }

  TEST_CASE("cuda: two sessions of one model sampling on two threads at once match running alone") {
    auto model = small_unet_model();
    auto a = cuda_session(model, 2, Precision::FP16), b = cuda_session(model, 2, Precision::FP16);
    SampleOptions oa, ob;
    oa.steps = ob.steps = g::on_gpu_or_emulated(20, 2);
    oa.seed = 1;
    ob.seed = 50;
    const auto ref_a = a->sample(oa), ref_b = b->sample(ob);
    SampleResult got_a, got_b;
    std::string error_a, error_b;  // an exception must not leave a thread (std::terminate)
    const auto run = [](Session& s, const SampleOptions& o, SampleResult& r, std::string& error) {
      try {
        r = s.sample(o);
      } catch (const std::exception& e) {
        error = e.what();
      }
    };
    std::thread ta(run, std::ref(*a), std::cref(oa), std::ref(got_a), std::ref(error_a));
    std::thread tb(run, std::ref(*b), std::cref(ob), std::ref(got_b), std::ref(error_b));
    ta.join();
    tb.join();
    CHECK_MESSAGE(error_a.empty(), error_a);
    CHECK_MESSAGE(error_b.empty(), error_b);
    CHECK(bitwise_equal(got_a.images, ref_a.images));
    CHECK(bitwise_equal(got_b.images, ref_b.images));
  }

  TEST_CASE("cuda: output_on_device leaves the same images in device memory") {
    auto gpu = cuda_session(test::tiny_model(), 2);
    SampleOptions o;
    o.steps = 4;
    const auto host = gpu->sample(o);
    o.output_on_device = true;
    const auto dev = gpu->sample(o);
    CHECK(dev.images.empty());
    REQUIRE(dev.device_images != nullptr);
    std::vector<float> copy(host.images.size());
    GPU_CHECK(cudaMemcpy(copy.data(), dev.device_images, copy.size() * 4, cudaMemcpyDeviceToHost));
    CHECK(bitwise_equal(copy, host.images));
  }

  TEST_CASE("cuda: a plan that cannot fit in device memory is a clean OutOfMemory error") {
    SessionOptions o;
    o.backend = BackendKind::Cuda;
    o.batch = 4096;
    o.height = 1024;
    o.width = 768;
    o.precision = Precision::FP32;
    try {
      Session::create(test::tiny_model(), o);
      FAIL("expected OutOfMemory");
    } catch (const Error& e) {
      MESSAGE(e.what());
      CHECK(e.code() == ErrorCode::OutOfMemory);
    }
    // The device is still usable afterwards.
    CHECK_NOTHROW(cuda_session(test::tiny_model(), 1)->forward(std::vector<float>(3 * 16 * 12, 0.f), std::vector<int>{5}));
  }

  TEST_CASE("cuda: the step kernel with caller noise, trajectory, next input and dynamic thresholds equals the host bitwise") {
    // Every optional output of the step at once, in fp32 and with an fp16 model output / next
    // input: the device's x, x0, trajectory slice and next input against the host's shared math
    // on the same floats. The thresholds are the host's (dynamic_threshold of the unclipped x0).
    const int n = 2, c = 3, hw = 40;
    const std::size_t E = std::size_t(c) * hw, NE = std::size_t(n) * E;
    const double ratio = 0.9, max_value = 1.7;
    std::vector<DdimStepParams> steps(2);
    steps[0] = {0.3f, 0.95393920f, 0.5f, 0.7f, 0.2f, 1.f, kPredEpsilon, kClipThreshold, 1, 900, kUpdateDdim};
    steps[1] = {0.9f, 0.43588989f, 0.95f, 0.f, 0.05f, 1.f, kPredV, kClipThreshold, 0, 10, kUpdateDdpm, 0.4f, 0.55f};
    const auto noise = g::random_vector(steps.size() * NE, 77, -2.f, 2.f);  // (S, n, c, hw) as a caller gives it
    const std::vector<std::uint64_t> seeds{5, 6};
    for (DType t : {DType::F32, DType::F16}) {
      for (int step = 0; step < 2; ++step) {
        CAPTURE(cuda::to_string(t));
        CAPTURE(step);
        const DdimStepParams& p = steps[std::size_t(step)];
        const auto x = g::random_vector(NE, 1 + step, -3.f, 3.f);
        const auto out = g::rounded(g::random_vector(NE, 2 + step, -2.f, 2.f), t);
        // Host: per sample, the threshold of the unclipped x0, then the step.
        std::vector<float> thresholds(n), ref_prev(NE), ref_x0(NE);
        for (int b = 0; b < n; ++b) {
          std::vector<float> x0u(E);
          for (std::size_t e = 0; e < E; ++e) x0u[e] = ddim_pred_x0(x[b * E + e], out[b * E + e], p);
          thresholds[std::size_t(b)] = dynamic_threshold(x0u, ratio, max_value);
          const std::span<const float> z(noise.data() + (std::size_t(step) * n + b) * E, E);
          ddim_step_sample(p, std::span(x).subspan(b * E, E), std::span(out).subspan(b * E, E), z,
                           std::span(ref_x0).subspan(b * E, E), std::span(ref_prev).subspan(b * E, E), ratio, max_value);
        }
        g::DevBytes d_params(steps.size() * sizeof(DdimStepParams)), d_index(4), d_seeds(16), d_noise(noise.size() * 4),
            d_x(NE * 4), d_x0(steps.size() * NE * 4), d_traj((steps.size() + 1) * NE * 4), d_thr(n * 4);
        g::DevTensor d_out(g::nchw_to_nhwc(out, n, c, hw), t), d_next(NE, t);
        d_params.upload(steps.data());
        d_index.upload(&step);
        d_seeds.upload(seeds.data());
        d_noise.upload(noise.data());
        d_x.upload(g::nchw_to_nhwc(x, n, c, hw).data());
        d_thr.upload(thresholds.data());
        d_x0.fill(0xFF);
        d_traj.fill(0xFF);
        d_next.mem.fill(0xFF);
        cuda::StepLaunch s{n, c, hw, static_cast<const DdimStepParams*>(d_params.data()), static_cast<const int*>(d_index.data()),
                           static_cast<const std::uint64_t*>(d_seeds.data()), static_cast<const float*>(d_noise.data()),
                           static_cast<float*>(d_x.data()), d_out.data(), static_cast<float*>(d_x0.data()),
                           static_cast<float*>(d_traj.data()), d_next.data(), static_cast<const float*>(d_thr.data())};
        cuda::ddim_step(s, t, nullptr);
        g::sync();
        std::vector<float> got(NE), x0_all(steps.size() * NE), traj((steps.size() + 1) * NE);
        d_x.download(got.data());
        d_x0.download(x0_all.data());
        d_traj.download(traj.data());
        const auto slice = [&](const std::vector<float>& v, std::size_t k) {
          return g::nhwc_to_nchw(std::vector<float>(v.begin() + std::ptrdiff_t(k * NE), v.begin() + std::ptrdiff_t((k + 1) * NE)),
                                 n, c, hw);
        };
        CHECK(bitwise_equal(g::nhwc_to_nchw(got, n, c, hw), ref_prev));
        CHECK(bitwise_equal(slice(x0_all, std::size_t(step)), ref_x0));
        CHECK(bitwise_equal(slice(traj, std::size_t(step) + 1), ref_prev));
        CHECK(bitwise_equal(g::nhwc_to_nchw(d_next.read(), n, c, hw), g::rounded(ref_prev, t)));
        for (const g::DevBytes* d : {&d_x, &d_x0, &d_traj, &d_thr}) CHECK(d->guards_intact());
        CHECK(d_next.mem.guards_intact());
      }
    }
  }

  TEST_CASE("cuda: creating a session while another thread captures a graph leaves that capture intact") {
    // Session creation uploads weights, plans and warms up: none of it may synchronise the whole
    // device, which would invalidate a capture running on another thread (e.g. another session's
    // first sample).
    cudaStream_t stream = nullptr;
    GPU_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    const std::vector<float> x = g::random_vector(1000, 5, -1.f, 1.f);
    g::DevTensor buf(x, DType::F32);
    cuda::scale_shift(buf.data(), buf.data(), DType::F32, x.size(), 1.f, 0.f, stream);  // loads the kernel before capturing
    GPU_CHECK(cudaStreamSynchronize(stream));
    GPU_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    cuda::scale_shift(buf.data(), buf.data(), DType::F32, x.size(), 2.f, 1.f, stream);
    std::string error;
    std::thread other([&] {
      try {
        auto session = cuda_session(test::tiny_model(77), 1);  // a new model: its weights are uploaded now
        (void)session->forward(std::vector<float>(3 * 16 * 12, 0.5f), std::vector<int>{500});
      } catch (const std::exception& e) {
        error = e.what();
      }
    });
    other.join();
    CHECK_MESSAGE(error.empty(), error);
    cudaGraph_t graph = nullptr;
    CHECK(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
    REQUIRE(graph != nullptr);
    cudaGraphExec_t exec = nullptr;
    GPU_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    GPU_CHECK(cudaGraphLaunch(exec, stream));
    GPU_CHECK(cudaStreamSynchronize(stream));
    const auto got = buf.read();
    for (std::size_t i = 0; i < x.size(); ++i) REQUIRE(got[i] == x[i] * 2.f + 1.f);
    GPU_CHECK(cudaGraphExecDestroy(exec));
    GPU_CHECK(cudaGraphDestroy(graph));
    GPU_CHECK(cudaStreamDestroy(stream));
  }

  TEST_CASE("cuda: the presets' resnet convolutions run as fused cuDNN plans [cudnn]") {
    // Every convolution that adds the time embedding or the residual must do it inside its cuDNN
    // plan (PlanInfo::fusions says "cuDNN fused"): a plan that silently fell back to the
    // epilogue kernel or the direct kernel costs a pass over the activations per layer.
    for (const auto& [name, config] : {std::pair{"cifar10-32", graph::UNetConfig::cifar10()},
                                       std::pair{"celebahq-256", graph::UNetConfig::celebahq256()}}) {
      CAPTURE(name);
      auto session = cuda_session(preset_model(config), 1, Precision::FP16);
      int convs = 0, fused = 0, with_adds = 0;
      for (const std::string& f : session->plan_info().fusions) {
        if (f.find(": conv ") == std::string::npos) continue;
        ++convs;
        const bool adds = f.find("time embedding") != std::string::npos || f.find("residual") != std::string::npos;
        with_adds += adds;
        const bool is_fused = f.find("[cuDNN fused") != std::string::npos;
        fused += is_fused;
        if (adds) CHECK_MESSAGE(is_fused, f);
      }
      MESSAGE(name << ": " << convs << " convolutions, " << with_adds << " with a time-embedding or residual add, "
                   << fused << " fused in cuDNN");
      CHECK(with_adds > 0);
    }
  }
}
