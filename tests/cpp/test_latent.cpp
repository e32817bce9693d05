// Latent models (format version 2): the vector_quantize op, the decoder graph, loading, and a
// session that samples latents and decodes them once at the end.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "graph/decoder.hpp"
#include "model_impl.hpp"
#include "test_util.hpp"

using namespace ddim;
using nlohmann::json;

namespace {

std::vector<float> normal_vec(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d;
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// The index by exhaustive double-precision search (the oracle), and the gap to the runner-up.
std::pair<int, double> nearest(const float* z, int stride, const std::vector<float>& cb, int K, int C, double* gap) {
  double best = INFINITY, second = INFINITY;
  int k_best = -1;
  for (int k = 0; k < K; ++k) {
    double d = 0;
    for (int c = 0; c < C; ++c) d += std::pow(double(z[c * stride]) - cb[std::size_t(k) * C + c], 2);
    if (d < best) second = best, best = d, k_best = k;
    else if (d < second) second = d;
  }
  *gap = (second - best) / std::max(best, 1e-30);
  return {k_best, best};
}

using test::latent_model;
using test::small_decoder;
using test::small_latent_unet;

}  // namespace

TEST_CASE("vector_quantize: the nearest entry (against a double-precision search), ties to the lowest index") {
  const int n = 2, c = 3, hw = 50, K = 40;
  std::vector<float> cb = normal_vec(std::size_t(K) * c, 1);
  for (int ch = 0; ch < c; ++ch) cb[std::size_t(30) * c + ch] = cb[std::size_t(12) * c + ch];  // entry 30 == entry 12
  std::vector<float> x = normal_vec(std::size_t(n) * c * hw, 2);
  for (int ch = 0; ch < c; ++ch) x[std::size_t(ch) * hw + 7] = cb[std::size_t(12) * c + ch];  // a pixel exactly on both
  std::vector<float> y(x.size());
  std::vector<int> idx(std::size_t(n) * hw);
  cpu::ThreadPool pool(2);
  cpu::vector_quantize(x.data(), n, c, hw, cb.data(), K, y.data(), idx.data(), &pool);
  int checked = 0;
  for (int b = 0; b < n; ++b)
    for (int i = 0; i < hw; ++i) {
      double gap = 0;
      const auto [k, d] = nearest(x.data() + std::size_t(b) * c * hw + i, hw, cb, K, c, &gap);
      const int got = idx[std::size_t(b) * hw + i];
      if (gap > 1e-4) {
        CHECK(got == k);
        ++checked;
      }
      for (int ch = 0; ch < c; ++ch) CHECK(y[(std::size_t(b) * c + ch) * hw + i] == cb[std::size_t(got) * c + ch]);
    }
  CHECK(checked >= 95);
  CHECK(idx[7] == 12);  // the exact tie: the lower of 12 and 30
  // In place (y == x) gives the same, and so does each sample alone on one thread.
  std::vector<float> inplace = x;
  cpu::vector_quantize(inplace.data(), n, c, hw, cb.data(), K, inplace.data(), nullptr, nullptr);
  CHECK(test::bitwise_equal(inplace, y));
  std::vector<float> one(std::size_t(c) * hw);
  cpu::vector_quantize(x.data() + std::size_t(c) * hw, 1, c, hw, cb.data(), K, one.data(), nullptr, nullptr);
  CHECK(std::memcmp(one.data(), y.data() + std::size_t(c) * hw, one.size() * sizeof(float)) == 0);
  CHECK_THROWS_AS(cpu::vector_quantize(x.data(), 1, c, hw, cb.data(), 0, y.data(), nullptr, nullptr), Error);
}

TEST_CASE("latent model: the decoder graph and the latent config load with the U-Net") {
  const auto vq = latent_model("vq");
  const ModelInfo& info = vq->info();
  REQUIRE(info.is_latent());
  CHECK(info.format_version == 2);
  CHECK(info.latent.decoder == "vq");
  CHECK(info.latent.component == "vqvae");
  CHECK(info.latent.factor == 2);
  CHECK(info.latent.image_channels == 3);
  CHECK(info.latent.scaling_factor == 0.5);
  const auto built = graph::build_decoder(small_decoder("vq"));
  CHECK(info.latent.decoder_parameter_count == built.parameter_count());
  CHECK(info.parameter_count == graph::build_unet2d(small_latent_unet()).parameter_count());
  const auto& dec = vq->impl().decoder->impl().graph;
  CHECK(dec.nodes.front().op == graph::Op::VectorQuantize);
  CHECK(dec.values[dec.output].h == 16);
  CHECK(dec.values[dec.output].w == 12);
  CHECK(test::contains(vq->summary(), "decoder"));
  const auto kl = latent_model("kl");
  CHECK(kl->info().latent.decoder == "kl");
  for (const auto& n : kl->impl().decoder->impl().graph.nodes) CHECK(n.op != graph::Op::VectorQuantize);
  // Pixel-space models are still version 1 and have no decoder.
  CHECK(test::tiny_model()->info().format_version == 1);
  CHECK_FALSE(test::tiny_model()->info().is_latent());
}

TEST_CASE("latent model: rejections name the key or tensor") {
  const graph::UNetConfig u = small_latent_unet();
  const graph::BuiltUNet net = graph::build_unet2d(u);
  auto file = [&](const graph::DecoderConfig& d, const std::function<void(std::map<std::string, std::string>&,
                                                                          std::vector<format::TensorData>&)>& edit) {
    const graph::BuiltDecoder dec = graph::build_decoder(d);
    std::uint64_t state = 5;
    std::vector<format::TensorData> tensors;
    graph::append_random_tensors(net.params, state, format::DType::F32, tensors);
    graph::append_random_tensors(dec.params, state, format::DType::F32, tensors);
    auto meta = graph::make_latent_metadata(net.graph, ScheduleConfig{}, dec);
    edit(meta, tensors);
    return format::serialize(tensors, meta);
  };
  auto load_error = [](const std::vector<std::uint8_t>& bytes) -> std::string {
    try {
      Model::load_from_memory(bytes, "bad");
    } catch (const Error& e) {
      CHECK(e.code() == ErrorCode::InvalidFile);
      return e.what();
    }
    FAIL("the file loaded");
    return {};
  };
  CHECK_NOTHROW(Model::load_from_memory(file(small_decoder("vq"), [](auto&, auto&) {}), "ok"));
  CHECK(test::contains(load_error(file(small_decoder("vq"), [](auto& m, auto&) { m["ddim.format_version"] = "1"; })),
                       "needs format version 2"));
  CHECK(test::contains(load_error(file(small_decoder("vq"), [](auto& m, auto&) { m.erase("ddim.latent"); })),
                       "without 'ddim.latent'"));
  CHECK(test::contains(load_error(file(small_decoder("vq"), [](auto&, auto& t) { t.pop_back(); })), "is missing"));
  CHECK(test::contains(load_error(file(small_decoder("vq"),
                                       [](auto& m, auto&) {
                                         auto j = json::parse(m["ddim.latent"]);
                                         j["scaling_factor"] = 0;
                                         m["ddim.latent"] = j.dump();
                                       })),
                       "scaling_factor"));
  CHECK(test::contains(load_error(file(small_decoder("vq"),
                                       [](auto& m, auto&) {
                                         auto j = json::parse(m["ddim.latent"]);
                                         j["factor"] = 4;  // the graph upsamples by 2
                                         m["ddim.latent"] = j.dump();
                                       })),
                       "decoder's factor 4"));
  graph::DecoderConfig wrong = small_decoder("vq");
  wrong.latent_channels = 3;  // the U-Net samples 4 channels
  CHECK(test::contains(load_error(file(wrong, [](auto&, auto&) {})), "differs from the U-Net's"));
  CHECK(test::contains(load_error(file(small_decoder("vq"),
                                       [](auto& m, auto&) {
                                         auto j = json::parse(m["ddim.decoder"]);
                                         j["inputs"]["timestep"] = json::object();
                                         m["ddim.decoder"] = j.dump();
                                       })),
                       "unknown input 'timestep'"));
}

TEST_CASE("latent session: samples latents, decodes once; decode off; sizes in pixels; decode equals sample's images") {
  const auto model = latent_model("vq");
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.batch = 2;
  o.threads = 2;
  const auto session = Session::create(model, o);
  CHECK(test::contains(session->plan_info().decoder, "latents (4, 8, 6) -> image (3, 16, 12)"));
  SampleOptions so;
  so.steps = 3;
  so.seed = 4;
  so.want_trajectory = true;
  const SampleResult r = session->sample(so);
  CHECK(r.c == 3);
  CHECK(r.h == 16);
  CHECK(r.w == 12);
  CHECK(r.latent_c == 4);
  CHECK(r.latent_h == 8);
  CHECK(r.latent_w == 6);
  REQUIRE(r.images.size() == std::size_t(2 * 3 * 16 * 12));
  REQUIRE(r.trajectory.size() == std::size_t(4 * 2 * 4 * 8 * 6));
  const std::span<const float> final_latents(r.trajectory.data() + 3 * 2 * 4 * 8 * 6, 2 * 4 * 8 * 6);
  const std::vector<float> again = session->decode(final_latents);
  CHECK(test::bitwise_equal(again, r.images));
  std::vector<std::string> dumped;
  session->decode(final_latents, [&](const std::string& node, const std::vector<std::int64_t>&, std::span<const float>) {
    dumped.push_back(node);
  });
  REQUIRE(!dumped.empty());
  CHECK(dumped.front() == "vqvae.quantize");
  CHECK(dumped.back() == "vqvae.decoder.conv_out");

  o.decode = false;
  const auto latents_only = Session::create(model, o);
  CHECK(latents_only->plan_info().decoder.empty());
  const SampleResult l = latents_only->sample(so);
  CHECK(l.c == 4);
  CHECK(l.h == 8);
  CHECK(test::bitwise_equal(l.images, std::vector<float>(final_latents.begin(), final_latents.end())));
  CHECK_THROWS_AS(latents_only->decode(final_latents), Error);

  o.decode = true;
  o.height = 32;
  o.width = 12;  // pixels: latents 16 x 6
  const auto bigger = Session::create(model, o);
  CHECK(bigger->sample(SampleOptions{.steps = 1}).h == 32);
  o.height = 15;
  CHECK(test::contains(test::error_of([&] { Session::create(model, o); }), "multiple of the decoder's factor 2"));
}

TEST_CASE("ldm-celebahq-256 preset: the architecture's parameter counts (diffusers' own, tests/python/test_latent.py)") {
  CHECK(graph::build_unet2d(graph::ldm_celebahq256_unet()).parameter_count() == 274056163);
  const graph::BuiltDecoder d = graph::build_decoder(graph::DecoderConfig::ldm_celebahq256());
  CHECK(d.parameter_count() == 32985359);
  CHECK(d.latent.factor == 4);
  CHECK(d.latent.component == "vqvae");
}

TEST_CASE("ddim CLI: latent models (sample sizes in pixels, --decode off, decode --dump) and the usage errors") {
  test::TempDir dir;
  const std::string model = dir / "latent.ddim";
  format::write_file(model, graph::make_random_latent_model_file(small_latent_unet(), small_decoder("vq"), ScheduleConfig{}, 3));
  const std::string pixel = dir / "pixel.ddim";
  format::write_file(pixel, graph::make_random_model_file(test::tiny_unet(), ScheduleConfig{}, 1));

  auto r = test::run_cli("sample --model " + model + " --steps 2 --batch 2 --device cpu --out " + dir / "img.png" +
                         " --trajectory " + dir / "traj.npy");
  CHECK_MESSAGE(r.code == 0, r.output);
  CHECK(test::contains(r.output, "samples 3x16x12"));
  CHECK(test::contains(r.output, "decoder 'vqvae'"));
  r = test::run_cli("sample --model " + model + " --steps 2 --batch 2 --device cpu --decode off --out " + dir / "lat.npy");
  CHECK_MESSAGE(r.code == 0, r.output);
  CHECK(test::contains(r.output, "samples 4x8x6"));
  r = test::run_cli("decode --model " + model + " --latents " + dir / "lat.npy" + " --device cpu --out " + dir / "dec.npy" +
                    " --dump " + dir / "dump");
  CHECK_MESSAGE(r.code == 0, r.output);
  CHECK(std::filesystem::exists(dir / "dump/vqvae.decoder.mid_block.attentions.0.npy"));
  CHECK(std::filesystem::exists(dir / "dump/nodes.txt"));
  r = test::run_cli("sample --model " + model + " --steps 1 --batch 1 --device cpu --height 15 --width 12 --out " +
                    dir / "x.npy");
  CHECK(r.code == 2);
  CHECK(test::contains(r.output, "multiples of the decoder's factor 2"));
  r = test::run_cli("sample --model " + pixel + " --steps 1 --batch 1 --device cpu --decode off --out " + dir / "x.npy");
  CHECK(r.code == 2);
  CHECK(test::contains(r.output, "--decode applies to latent models only"));
  r = test::run_cli("decode --model " + pixel + " --latents " + dir / "lat.npy" + " --device cpu --out " + dir / "x.npy");
  CHECK(r.code == 1);
  CHECK(test::contains(r.output, "pixel-space model"));
}
