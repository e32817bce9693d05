// Class-conditional models and classifier-free guidance on the CUDA backend (suite "gpu"): the
// per-sample table rows, the doubled forward and the CFG combine kernel against the CPU backend
// (fp32), graph replay against eager steps, batch independence. Under the CUDA emulator (gpu_emu)
// the U-Net is tiny and the samples take few steps.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "../cpp/test_util.hpp"
#include "ddim/ddim.hpp"
#include "graph/unet_builder.hpp"
#include "gpu_util.hpp"

using namespace ddim;
namespace g = ddim::test::gpu;

namespace {

std::shared_ptr<const Model> class_model(graph::ClassKind kind) {
  graph::UNetConfig c = test::tiny_unet();
  c.class_kind = kind;
  c.num_classes = 5;
  c.class_null.assign(kind == graph::ClassKind::Vector ? std::size_t(4 * c.block_out_channels[0]) : 1,
                      kind == graph::ClassKind::Index ? 4.f : 0.f);
  return Model::load_from_memory(graph::make_random_model_file(c, {}, 17), "class-model");
}

std::unique_ptr<Session> cuda_session(std::shared_ptr<const Model> model, int batch, bool profile = false) {
  SessionOptions o;
  o.backend = BackendKind::Cuda;
  o.batch = batch;
  o.precision = Precision::FP32;
  o.profile = profile;
  return Session::create(std::move(model), o);
}

ClassConditioning labels(std::shared_ptr<const Model> m, int n, double w, double phi) {
  ClassConditioning c;
  c.guidance_scale = w;
  c.guidance_rescale = phi;
  if (m->info().class_kind == "vector")
    for (int i = 0; i < n * m->info().class_dim; ++i) c.class_embeddings.push_back(float(std::cos(0.3 * i)));
  else
    for (int i = 0; i < n; ++i) c.class_labels.push_back(m->info().class_kind == "index" ? double(i % 4) : 100.0 * i + 3);
  return c;
}

}  // namespace

TEST_SUITE("gpu") {
  TEST_CASE("cuda: class-conditional sampling with guidance matches the CPU (each kind, w 1 and 3, rescale)") {
    const int steps = g::on_gpu_or_emulated(10, 2);
    for (auto kind : {graph::ClassKind::Index, graph::ClassKind::Scalar, graph::ClassKind::Vector}) {
      auto model = class_model(kind);
      auto cpu = test::cpu_session(model, 2);
      auto gpu = cuda_session(model, 2);
      CHECK(gpu->plan_info().forward_batch == 4);
      for (auto [w, phi] : {std::pair{1.0, 0.0}, std::pair{3.0, 0.0}, std::pair{3.0, 0.7}}) {
        CAPTURE(int(kind));
        CAPTURE(w);
        CAPTURE(phi);
        SampleOptions o;
        o.steps = steps;
        o.eta = 0.5;
        o.seed = 21;
        o.conditioning = labels(model, 2, w, phi);
        const auto ref = cpu->sample(o), got = gpu->sample(o);
        const auto d = g::compare(got.images, ref.images);
        MESSAGE("class kind " << int(kind) << ", w " << w << ", rescale " << phi << ": GPU fp32 vs CPU max abs " << d.max_abs);
        CHECK(d.non_finite == 0);
        CHECK(d.max_abs <= 1e-3);
        // The forward alone, guided.
        std::vector<float> x(ref.images);
        const std::vector<int> t{700};
        const auto fr = cpu->forward(x, t, o.conditioning), fg = gpu->forward(x, t, o.conditioning);
        CHECK(g::compare(fg, fr).max_abs <= 1e-4);
      }
    }
  }

  TEST_CASE("cuda: guided sampling replays its graph bitwise like eager steps; a sample's batch does not matter") {
    auto model = class_model(graph::ClassKind::Index);
    auto graphed = cuda_session(model, 2), eager = cuda_session(model, 2, /*profile=*/true);
    SampleOptions o;
    o.steps = g::on_gpu_or_emulated(6, 2);
    o.seeds = {5, 6};
    o.conditioning = labels(model, 2, 2.5, 0.0);
    const auto a = graphed->sample(o), b = graphed->sample(o), c = eager->sample(o);
    CHECK(test::bitwise_equal(a.images, b.images));
    CHECK(test::bitwise_equal(a.images, c.images));
    // w switches between calls: the captured step is rebuilt, and w = 1 again gives the first result.
    SampleOptions plain = o;
    plain.conditioning.guidance_scale = 1.0;
    const auto p1 = graphed->sample(plain);
    graphed->sample(o);
    CHECK(test::bitwise_equal(graphed->sample(plain).images, p1.images));
    // Sample 1 alone (its seed and label) equals sample 1 of the batch.
    auto lone = cuda_session(model, 1);
    SampleOptions one = o;
    one.seeds = {6};
    one.conditioning.class_labels = {o.conditioning.class_labels[1]};
    const auto single = lone->sample(one);
    const std::size_t E = single.images.size();
    CHECK(g::compare(single.images, std::vector<float>(a.images.begin() + long(E), a.images.end())).max_abs <= 1e-5);
  }
}
