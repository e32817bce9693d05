// Model loading: the ddim-level validation rules (version, graph, schedule, tensor references),
// each failure naming the key or tensor; dtype conversion at load.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "format/model_metadata.hpp"
#include "model_impl.hpp"

using namespace ddim;
using nlohmann::json;

namespace {

const char* kGraph = R"({
  "inputs": {"sample": {"channels": 2, "height": 4, "width": 4}, "timestep": {}},
  "output": "out",
  "nodes": [
    {"name": "temb", "op": "timestep_embedding", "inputs": ["timestep"], "attrs": {"dim": 4}},
    {"name": "proj", "op": "linear", "inputs": ["temb"], "attrs": {"out_features": 2},
     "params": {"weight": "proj.weight", "bias": "proj.bias"}},
    {"name": "sum", "op": "add", "inputs": ["sample", "proj"]},
    {"name": "out", "op": "conv2d", "inputs": ["sum"], "attrs": {"out_channels": 2, "kernel": 1},
     "params": {"weight": "out.weight"}}
  ]})";

struct Parts {
  std::vector<format::TensorData> tensors;
  std::map<std::string, std::string> meta;
  std::vector<std::uint8_t> bytes() const { return format::serialize(tensors, meta); }
};

Parts good_parts(format::DType dtype = format::DType::F32) {
  Parts p;
  std::vector<float> w8(8), w2(2), w4(4);
  for (int i = 0; i < 8; ++i) w8[i] = 0.25f * float(i) - 1.f;
  w2 = {0.5f, -0.5f};
  w4 = {1.f, 0.5f, -0.25f, 2.f};
  p.tensors.push_back(format::make_tensor_f32("proj.weight", {2, 4}, w8, dtype));
  p.tensors.push_back(format::make_tensor_f32("proj.bias", {2}, w2, dtype));
  p.tensors.push_back(format::make_tensor_f32("out.weight", {2, 2, 1, 1}, w4, dtype));
  p.meta = format::make_metadata(json::parse(kGraph), ScheduleConfig{});
  return p;
}

void expect_invalid(const Parts& p, const std::string& needle) {
  auto bytes = p.bytes();
  try {
    Model::load_from_memory(bytes, "m.ddim");
    FAIL("accepted; expected an error mentioning: " << needle);
  } catch (const Error& e) {
    INFO("message: " << e.what());
    CHECK(e.code() == ErrorCode::InvalidFile);
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
    CHECK(std::string(e.what()).find("m.ddim") != std::string::npos);
  }
}

}  // namespace

TEST_CASE("model: a valid file loads, F16 and BF16 weights are converted once at load") {
  for (auto dt : {format::DType::F32, format::DType::F16, format::DType::BF16}) {
    auto bytes = good_parts(dt).bytes();
    auto m = Model::load_from_memory(bytes, "m.ddim");
    CHECK(m->info().parameter_count == 8 + 2 + 4);
    CHECK(m->info().format_version == 1);
    CHECK(m->info().tensors_by_dtype.at(format::to_string(dt)) == 3);
    const float* w = m->impl().weight("proj.weight");
    for (int i = 0; i < 8; ++i) CHECK(w[i] == 0.25f * float(i) - 1.f);  // exact in all three dtypes
  }
}

TEST_CASE("model: every ddim-level rule rejects with the offending key or tensor named") {
  Parts p = good_parts();
  SUBCASE("missing format version") {
    p.meta.erase("ddim.format_version");
    expect_invalid(p, "lacks 'ddim.format_version'");
  }
  SUBCASE("newer format version") {
    p.meta["ddim.format_version"] = "3";
    expect_invalid(p, "format version 3 is newer than this reader supports (2); upgrade ddim");
  }
  SUBCASE("garbage format version") {
    p.meta["ddim.format_version"] = "1.0";
    expect_invalid(p, "'ddim.format_version' must be a positive integer");
  }
  SUBCASE("version zero") {
    p.meta["ddim.format_version"] = "0";
    expect_invalid(p, "format version 0 is not a valid version");
  }
  SUBCASE("missing graph") {
    p.meta.erase("ddim.graph");
    expect_invalid(p, "lacks 'ddim.graph'");
  }
  SUBCASE("graph that is not JSON") {
    p.meta["ddim.graph"] = "{nodes: [";
    expect_invalid(p, "ddim.graph");
  }
  SUBCASE("graph with a duplicate key") {
    p.meta["ddim.graph"] = std::string(kGraph).replace(1, 0, "\"output\": \"sum\", ");
    expect_invalid(p, "output");
  }
  SUBCASE("unknown op in the graph") {
    auto g = json::parse(kGraph);
    g["nodes"][2]["op"] = "mul";
    p.meta["ddim.graph"] = g.dump();
    expect_invalid(p, "unknown op 'mul'");
  }
  SUBCASE("unknown schedule key") {
    auto s = json::parse(p.meta["ddim.schedule"]);
    s["beta_shedule"] = "linear";
    p.meta["ddim.schedule"] = s.dump();
    expect_invalid(p, "key 'beta_shedule' is unknown");
  }
  SUBCASE("schedule value of the wrong type") {
    auto s = json::parse(p.meta["ddim.schedule"]);
    s["clip_sample"] = "yes";
    p.meta["ddim.schedule"] = s.dump();
    expect_invalid(p, "key 'clip_sample' must be true or false");
  }
  SUBCASE("unknown prediction type") {
    auto s = json::parse(p.meta["ddim.schedule"]);
    s["prediction_type"] = "noise";
    p.meta["ddim.schedule"] = s.dump();
    expect_invalid(p, "prediction_type");
  }
  SUBCASE("unknown ddim.* metadata key") {
    p.meta["ddim.extra"] = "1";
    expect_invalid(p, "unknown key 'ddim.extra'");
  }
  SUBCASE("missing tensor") {
    p.tensors.erase(p.tensors.begin() + 1);
    expect_invalid(p, "tensor 'proj.bias' needed by node 'proj' (linear) parameter 'bias' is missing");
  }
  SUBCASE("tensor of the wrong shape") {
    std::vector<float> w(8, 0.f);
    p.tensors[0] = format::make_tensor_f32("proj.weight", {4, 2}, w);
    expect_invalid(p, "tensor 'proj.weight' has shape [4, 2] but node 'proj' (linear) parameter 'weight' needs [2, 4]");
  }
  SUBCASE("unreferenced tensor") {
    std::vector<float> w(3, 0.f);
    p.tensors.push_back(format::make_tensor_f32("leftover.weight", {3}, w));
    expect_invalid(p, "tensor 'leftover.weight' is not used by the graph");
  }
  SUBCASE("F64 weight") {
    std::vector<float> w(2, 0.f);
    p.tensors[1] = format::make_tensor_f32("proj.bias", {2}, w, format::DType::F64);
    expect_invalid(p, "tensor 'proj.bias' is F64");
  }
  SUBCASE("NaN weight") {
    std::vector<float> w{0.f, std::nanf("")};
    p.tensors[1] = format::make_tensor_f32("proj.bias", {2}, w);
    expect_invalid(p, "tensor 'proj.bias' holds a NaN");
  }
  SUBCASE("alphas_cumprod tensor missing") {
    auto s = json::parse(p.meta["ddim.schedule"]);
    s["alphas_cumprod"] = "schedule.alphas_cumprod";
    p.meta["ddim.schedule"] = s.dump();
    expect_invalid(p, "tensor 'schedule.alphas_cumprod' named by ddim.schedule 'alphas_cumprod' is missing");
  }
  SUBCASE("alphas_cumprod of the wrong length") {
    auto s = json::parse(p.meta["ddim.schedule"]);
    s["alphas_cumprod"] = "ac";
    s["num_train_timesteps"] = 10;
    p.meta["ddim.schedule"] = s.dump();
    std::vector<float> ac(9, 0.5f);
    p.tensors.push_back(format::make_tensor_f32("ac", {9}, ac));
    expect_invalid(p, "tensor 'ac' (alphas_cumprod) has shape [9], expected [10]");
  }
}

TEST_CASE("model: an explicit alphas_cumprod table (F64) replaces the betas") {
  Parts p = good_parts();
  auto s = json::parse(p.meta["ddim.schedule"]);
  s["alphas_cumprod"] = "ac";
  s["num_train_timesteps"] = 4;
  p.meta["ddim.schedule"] = s.dump();
  std::vector<float> ac{0.9f, 0.5f, 0.25f, 0.125f};
  p.tensors.push_back(format::make_tensor_f32("ac", {4}, ac, format::DType::F64));
  auto bytes = p.bytes();
  auto m = Model::load_from_memory(bytes, "m.ddim");
  REQUIRE(m->schedule().alphas_cumprod.size() == 4);
  CHECK(m->schedule().alphas_cumprod[1] == 0.5);
  Scheduler sched(m->schedule());
  CHECK(sched.alphas_cumprod()[3] == 0.125);
}

TEST_CASE("model: load from a file, and file errors") {
  auto path = std::filesystem::temp_directory_path() / "ddim_test_model.ddim";
  format::write_file(path.string(), good_parts().bytes());
  auto m = Model::load(path);
  CHECK(m->info().in_channels == 2);
  std::filesystem::remove(path);
  try {
    Model::load(path);
    FAIL("loaded a missing file");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::Io);
    CHECK(std::string(e.what()).find("ddim_test_model.ddim") != std::string::npos);
  }
}

TEST_CASE("model: format version strings other than plain positive integers are rejected") {
  for (const char* v : {"01", " 1", "\t1", "1 ", "+1", "-1", "99999999999", "", "one"}) {
    Parts p = good_parts();
    p.meta["ddim.format_version"] = v;
    auto bytes = p.bytes();
    CHECK_THROWS_WITH_AS(Model::load_from_memory(bytes, "m.ddim"), doctest::Contains("ddim.format_version"), Error);
  }
}
