// The `ddim` tool end to end on a small model file the test writes itself: outputs equal the
// library's, and bad input gives a one-line error, a non-zero exit and no output file.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "npy.hpp"
#include "png.hpp"
#include "test_util.hpp"

using namespace ddim;
namespace fs = std::filesystem;

using ddim::test::CliRun;
using ddim::test::run_cli;
using ddim::test::TempDir;

namespace {

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
}

}  // namespace

TEST_CASE("cli: sample, forward, dump and info agree with the library") {
  TempDir dir;
  const std::string model_path = dir / "tiny.ddim";
  format::write_file(model_path, graph::make_random_model_file(test::tiny_unet(), ScheduleConfig{}, 4));
  auto model = Model::load(model_path);

  // sample -> .npy equals Session::sample with the same settings, bitwise.
  CliRun r = run_cli("sample --model " + model_path + " --steps 5 --batch 2 --seed 3 --eta 0.5 --device cpu --out " +
              dir / "x.npy");
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto arr = tools::read_npy_f32(dir / "x.npy");
  CHECK(arr.shape == std::vector<std::int64_t>{2, 3, 16, 12});
  SampleOptions o;
  o.steps = 5;
  o.seed = 3;
  o.eta = 0.5;
  auto lib = test::cpu_session(model, 2)->sample(o);
  CHECK(same_bits(arr.data, lib.images));

  // PNG grid and one PNG per image with its seed recorded.
  r = run_cli("sample --model " + model_path + " --steps 3 --batch 2 --seed 3 --device cpu --out " + dir / "grid.png" +
          " --out-dir " + dir / "imgs");
  REQUIRE(r.code == 0);
  auto grid = tools::read_png(dir / "grid.png");
  CHECK(grid.image.channels == 3);
  CHECK(grid.image.width > 2 * 12);
  auto one = tools::read_png(dir / "imgs/4_1.png");
  CHECK((one.image.width == 12 && one.image.height == 16));
  bool has_seed = false;
  for (const auto& [k, v] : one.text) has_seed |= k == "seed" && v == "4";
  CHECK(has_seed);

  // forward and --dump: the dumped output node equals the output, which equals the library's.
  std::vector<float> x(2 * 3 * 16 * 12);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(std::cos(0.1 * double(i)));
  std::vector<std::int64_t> shape{2, 3, 16, 12};
  tools::write_npy_f32(dir / "in.npy", shape, x);
  r = run_cli("forward --model " + model_path + " --x " + dir / "in.npy" + " --t 321 --device cpu --out " + dir / "eps.npy" +
          " --dump " + dir / "dump");
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto eps = tools::read_npy_f32(dir / "eps.npy");
  std::vector<int> t{321};
  auto lib_eps = test::cpu_session(model, 2)->forward(x, t);
  CHECK(same_bits(eps.data, lib_eps));
  CHECK(fs::exists(dir / "dump/nodes.txt"));
  auto dumped = tools::read_npy_f32(dir / "dump/conv_out.npy");
  CHECK(same_bits(dumped.data, lib_eps));
  CHECK(tools::read_npy_f32(dir / "dump/time_proj.npy").shape == std::vector<std::int64_t>{2, 16});

  r = run_cli("info " + model_path + " --plan");
  CHECK(r.code == 0);
  CHECK(r.output.find("parameters") != std::string::npos);
  CHECK(r.output.find("time_embedding.linear_1") != std::string::npos);  // a folded node
}

TEST_CASE("cli: bad input is a one-line error with a non-zero exit and no output file") {
  TempDir dir;
  const std::string model_path = dir / "tiny.ddim";
  format::write_file(model_path, graph::make_random_model_file(test::tiny_unet(), ScheduleConfig{}, 4));
  const std::string out = dir / "out.npy";
  struct Case {
    std::string args, needle;
    int code;
  };
  std::vector<Case> cases = {
      {"sample --model " + model_path + " --steps abc --out " + out, "--steps", 2},
      {"sample --model " + model_path + " --stepz 5 --out " + out, "--stepz", 2},
      {"sample --model " + dir / "missing.ddim" + " --out " + out, "missing.ddim", 1},
      {"sample --model " + model_path + " --steps 2000 --device cpu --out " + out, "--steps 2000", 2},
      {"sample --model " + model_path + " --spacing sideways --out " + out, "sideways", 2},
      {"frobnicate", "frobnicate", 2},
  };
  // A corrupt model file: the right header length prefix, garbage after it.
  {
    std::ofstream f(dir / "bad.ddim", std::ios::binary);
    f << std::string("\x10\0\0\0\0\0\0\0{\"a\": \"b\"}      ", 24);
  }
  cases.push_back({"sample --model " + dir / "bad.ddim" + " --out " + out, "bad.ddim", 1});
  // Per-step noise with eta = 0.
  std::vector<float> z(5 * 1 * 3 * 16 * 12, 0.f);
  std::vector<std::int64_t> zs{5, 1, 3, 16, 12};
  tools::write_npy_f32(dir / "z.npy", zs, z);
  cases.push_back({"sample --model " + model_path + " --batch 1 --steps 5 --noise " + dir / "z.npy" + " --device cpu --out " + out,
                   "eta", 2});
  for (const auto& c : cases) {
    CliRun r = run_cli(c.args);
    INFO(c.args << "\n" << r.output);
    CHECK(r.code == c.code);
    CHECK(r.output.rfind("ddim: error:", 0) == 0);
    CHECK(r.output.find(c.needle) != std::string::npos);
    CHECK(!fs::exists(out));
  }
}

TEST_CASE("cli: --help states every option's default") {
  CliRun r = run_cli("sample --help");
  CHECK(r.code == 0);
  for (const char* s : {"--steps N", "(default: 50)", "--eta X", "(default: 0)", "--batch N", "(default: 16)", "--device DEV",
                        "(default: auto)", "--x-T FILE", "--noise FILE", "--trajectory FILE", "--clip-sample on|off"})
    CHECK_MESSAGE(r.output.find(s) != std::string::npos, s);
}

TEST_CASE("cli: class-conditional models: labels, guidance and their errors") {
  TempDir dir;
  graph::UNetConfig c = test::tiny_unet();
  c.class_kind = graph::ClassKind::Index;
  c.num_classes = 5;
  const std::string cc = dir / "cc.ddim", cc_null = dir / "cc_null.ddim", plain = dir / "plain.ddim";
  format::write_file(cc, graph::make_random_model_file(c, ScheduleConfig{}, 8));
  c.class_null = {4.f};
  format::write_file(cc_null, graph::make_random_model_file(c, ScheduleConfig{}, 8));
  format::write_file(plain, graph::make_random_model_file(test::tiny_unet(), ScheduleConfig{}, 4));
  const std::string out = dir / "out.npy";

  // The CLI equals the library, with per-sample labels (their count sets the batch) and guidance.
  CliRun r = run_cli("sample --model " + cc_null + " --steps 3 --seed 2 --class-labels 1,3 --guidance-scale 2.5 "
                     "--guidance-rescale 0.5 --device cpu --threads 2 --out " + out);
  INFO(r.output);
  REQUIRE(r.code == 0);
  SampleOptions o;
  o.steps = 3;
  o.seed = 2;
  o.conditioning.class_labels = {1, 3};
  o.conditioning.guidance_scale = 2.5;
  o.conditioning.guidance_rescale = 0.5;
  auto lib = test::cpu_session(Model::load(cc_null), 2)->sample(o);
  CHECK(same_bits(tools::read_npy_f32(out).data, lib.images));
  // A caller's null label instead of none recorded gives the same as the recorded one.
  r = run_cli("sample --model " + cc + " --steps 3 --seed 2 --class-labels 1,3 --guidance-scale 2.5 --guidance-rescale 0.5 "
              "--null-class-label 4 --device cpu --threads 2 --out " + dir / "out2.npy");
  REQUIRE(r.code == 0);
  CHECK(same_bits(tools::read_npy_f32(dir / "out2.npy").data, lib.images));
  fs::remove(out);
  r = run_cli("info " + cc_null + " --plan --device cpu");
  CHECK(r.code == 0);
  CHECK(r.output.find("class labels:   index, integers in [0, 5); null label 4 recorded") != std::string::npos);
  CHECK(r.output.find("folded per (step, class label)") != std::string::npos);
  CHECK(r.output.find("forward batch: 2") != std::string::npos);

  struct Case {
    std::string args, needle;
  };
  const std::vector<Case> cases = {
      {"sample --model " + cc + " --steps 2 --batch 2", "give --class-labels"},
      {"sample --model " + cc + " --steps 2 --class-labels 5", "--class-labels entry 1: 5 is not an integer in [0, 5)"},
      {"sample --model " + cc + " --steps 2 --class-labels 1.5", "is not an integer"},
      {"sample --model " + cc + " --steps 2 --class-labels nan", "--class-labels entry 1"},
      {"sample --model " + cc + " --steps 2 --class-labels 1,2,3 --batch 2", "3 labels for a batch of 2"},
      {"sample --model " + cc + " --steps 2 --class-labels 1 --guidance-scale 3", "needs the unconditional input"},
      {"sample --model " + cc + " --steps 2 --class-labels 1 --guidance-scale -1", "--guidance-scale"},
      {"sample --model " + cc + " --steps 2 --class-labels 1 --guidance-rescale 2", "--guidance-rescale"},
      {"sample --model " + cc + " --steps 2 --class-labels 1 --null-class-label 9 --guidance-scale 2", "--null-class-label: 9"},
      {"sample --model " + cc + " --sampler ddpm --class-labels 1", "--class-labels applies to --sampler ddim only"},
      {"sample --model " + plain + " --steps 2 --class-labels 1", "--class-labels: the model is unconditional"},
      {"sample --model " + plain + " --steps 2 --guidance-scale 2", "--guidance-scale: the model is unconditional"},
      {"sample --model " + cc + " --steps 2 --class-embeddings " + dir / "missing.npy", "missing.npy"},
  };
  for (const auto& k : cases) {
    r = run_cli(k.args + " --device cpu --out " + out);
    INFO(k.args << "\n" << r.output);
    CHECK(r.code != 0);
    CHECK(r.output.rfind("ddim: error:", 0) == 0);
    CHECK(r.output.find('\n') == r.output.size() - 1);
    CHECK(r.output.find(k.needle) != std::string::npos);
    CHECK(!fs::exists(out));
  }
}
