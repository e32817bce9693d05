// weights/FORMAT.md section 8 lists every class of file the reader rejects with the error it gives.
// This test reads that table, builds one hostile file per class and checks the message the reader
// gives against the documented words (and the error code); a class without a file here, or a file
// here without a row there, fails the test.
#include <doctest/doctest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "format/input_file.hpp"
#include "format/model_metadata.hpp"
#include "test_util.hpp"

using namespace ddim;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

struct Row {
  std::string id, code, words;
};

// The rows of the rejection table: | `ID` | what is wrong | `Code` | `words of the message` |
std::vector<Row> documented_rows() {
  const fs::path path = fs::path(__FILE__).parent_path().parent_path().parent_path() / "weights" / "FORMAT.md";
  std::ifstream f(path);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path.string());
  const std::regex row(R"(^\| `([A-Z][0-9]+)` \|.*\| `(InvalidFile|Io)` \| `([^`]+)` \|\s*$)");
  std::vector<Row> rows;
  std::string line;
  while (std::getline(f, line)) {
    std::smatch m;
    if (std::regex_match(line, m, row)) rows.push_back({m[1], m[2], m[3]});
  }
  return rows;
}

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
  json graph = json::parse(kGraph);
  json schedule = format::schedule_to_json(ScheduleConfig{}, std::nullopt);
  std::set<std::string> drop;  // metadata keys left out
  std::vector<std::uint8_t> bytes() const {
    std::map<std::string, std::string> m = meta;
    if (!m.count("ddim.graph")) m["ddim.graph"] = graph.dump();
    if (!m.count("ddim.schedule")) m["ddim.schedule"] = schedule.dump();
    for (const std::string& key : drop) m.erase(key);
    return format::serialize(tensors, m);
  }
};

Parts good() {
  Parts p;
  const std::vector<float> w8 = {0.1f, 0.2f, 0.3f, 0.4f, -0.1f, -0.2f, -0.3f, -0.4f}, w2 = {0.5f, -0.5f},
                           w4 = {1.f, 0.5f, -0.25f, 2.f};
  p.tensors.push_back(format::make_tensor_f32("proj.weight", {2, 4}, w8));
  p.tensors.push_back(format::make_tensor_f32("proj.bias", {2}, w2));
  p.tensors.push_back(format::make_tensor_f32("out.weight", {2, 2, 1, 1}, w4));
  p.meta["ddim.format_version"] = "1";
  return p;
}

std::vector<std::uint8_t> edit(const std::function<void(Parts&)>& f) {
  Parts p = good();
  f(p);
  return p.bytes();
}

// A container from its header text and data bytes.
std::vector<std::uint8_t> raw(const std::string& header, std::size_t data_bytes = 0) {
  std::vector<std::uint8_t> out(8 + header.size() + data_bytes, 0);
  for (int i = 0; i < 8; ++i) out[std::size_t(i)] = std::uint8_t(std::uint64_t(header.size()) >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  return out;
}

const std::string kEntry = R"("x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";

// The message and code of loading `bytes`, or of `load` for the classes about files on disk.
struct Outcome {
  ErrorCode code = ErrorCode::Internal;
  std::string message;
};

Outcome outcome(const std::function<void()>& load) {
  try {
    load();
  } catch (const Error& e) {
    return {e.code(), e.what()};
  }
  return {ErrorCode::Internal, "<accepted>"};
}

Outcome load_bytes(const std::vector<std::uint8_t>& bytes) {
  return outcome([&] { Model::load_from_memory(bytes, "hostile.ddim"); });
}

std::map<std::string, std::function<Outcome()>> hostile_files(const test::TempDir& dir) {
  std::map<std::string, std::function<Outcome()>> m;
  const auto b = [&](const std::string& id, std::function<std::vector<std::uint8_t>()> make) {
    m[id] = [make] { return load_bytes(make()); };
  };
  // ---- files on disk
  m["F1"] = [&] {
    const fs::path fifo = dir.path / "model.fifo";
    if (!fs::exists(fifo)) REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    return outcome([&] { Model::load(fifo); });
  };
  m["F2"] = [&] { return outcome([&] { Model::load(dir.path); }); };
  m["F3"] = [&] { return outcome([&] { Model::load("/proc/self/status"); }); };
  m["F4"] = [&] {
    const fs::path path = dir.path / "shrinks.ddim";
    format::write_file(path.string(), good().bytes());
    const format::InputFile file(path);
    fs::resize_file(path, 10);
    std::vector<std::uint8_t> all(file.size());
    return outcome([&] { file.read_at(0, all); });
  };
  // ---- the container
  b("C1", [] { return std::vector<std::uint8_t>{1, 2, 3}; });
  b("C2", [] {
    std::vector<std::uint8_t> f = raw("{}");
    const std::uint64_t n = 100'000'001;
    for (int i = 0; i < 8; ++i) f[std::size_t(i)] = std::uint8_t(n >> (8 * i));
    return f;
  });
  b("C3", [] {
    std::vector<std::uint8_t> f = raw("{}");
    f[0] = 200;
    return f;
  });
  b("C4", [] { return raw("{\"\xff\": 1}"); });
  b("C5", [] { return raw("{\"x\": NaN}"); });
  b("C6", [] { return raw("[1, 2]"); });
  b("C7", [] { return raw("{" + kEntry + ", " + kEntry + "}", 8); });
  b("C8", [] { return raw(R"({"x": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 8); });
  b("C9", [] { return raw("{\"__metadata__\": " + std::string(200, '[') + std::string(200, ']') + "}"); });
  b("C10", [] {
    std::string h = "{";
    for (int i = 0; i <= 65536; ++i) h += (i ? ",\"t" : "\"t") + std::to_string(i) + R"(":{"dtype":"F32","shape":[0],"data_offsets":[0,0]})";
    return raw(h + "}");
  });
  b("C11", [] { return raw(R"({"__metadata__": [1]})"); });
  b("C12", [] { return raw(R"({"__metadata__": {"k": 1}})"); });
  b("C13", [] { return raw(R"({"": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 8); });
  b("C14", [] { return raw(R"({"x": [1]})"); });
  b("C15", [] { return raw(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}})", 8); });
  b("C16", [] { return raw(R"({"x": {"dtype": "F32", "shape": [2]}})", 8); });
  b("C17", [] { return raw(R"({"x": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8); });
  b("C18", [] { return raw(R"({"x": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}})", 8); });
  b("C19", [] { return raw(R"({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8); });
  b("C20", [] { return raw(R"({"x": {"dtype": "F32", "shape": [1,1,1,1,1,1,1,1,1], "data_offsets": [0, 4]}})", 4); });
  b("C21", [] {
    return raw(R"({"x": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", 8);
  });
  b("C22", [] { return raw(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8); });
  b("C23", [] { return raw(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}})", 12); });
  b("C24", [] { return raw(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4); });
  b("C25", [] {
    return raw(R"({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
               12);
  });
  b("C26", [] {
    return raw(R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
               8);
  });
  b("C27", [] { return raw("{" + kEntry + "}", 12); });
  // ---- the __metadata__ keys
  b("M1", [] { return edit([](Parts& p) { p.drop.insert("ddim.graph"); }); });
  b("M2", [] { return edit([](Parts& p) { p.meta["ddim.format_version"] = "1.0"; }); });
  b("M3", [] { return edit([](Parts& p) { p.meta["ddim.format_version"] = "0"; }); });
  b("M4", [] { return edit([](Parts& p) { p.meta["ddim.format_version"] = "3"; }); });
  b("M5", [] { return edit([](Parts& p) { p.meta["ddim.extra"] = "1"; }); });
  b("M6", [] { return edit([](Parts& p) { p.meta["ddim.graph"] = "{\"inputs\": }"; }); });
  // ---- the graph
  b("G1", [] { return edit([](Parts& p) { p.graph["layers"] = 1; }); });
  b("G2", [] { return edit([](Parts& p) { p.graph["inputs"] = json::array(); }); });
  b("G3", [] { return edit([](Parts& p) { p.graph["nodes"][0].erase("name"); }); });
  b("G4", [] { return edit([](Parts& p) { p.graph["nodes"][1]["name"] = "temb"; }); });
  b("G5", [] { return edit([](Parts& p) { p.graph["nodes"][2]["op"] = "multiply"; }); });
  b("G6", [] { return edit([](Parts& p) { p.graph["nodes"][3]["inputs"] = json::array({"sum", "sum"}); }); });
  b("G7", [] { return edit([](Parts& p) { p.graph["nodes"][2]["inputs"] = json::array({"sample", "out"}); }); });
  b("G8", [] { return edit([](Parts& p) { p.graph["nodes"][3]["attrs"]["dilation"] = 2; }); });
  b("G9", [] { return edit([](Parts& p) { p.graph["nodes"][3]["attrs"]["kernel"] = "one"; }); });
  b("G10", [] { return edit([](Parts& p) { p.graph["nodes"][3].erase("params"); }); });
  b("G11", [] {
    return edit([](Parts& p) {
      p.graph["nodes"][3] = json::parse(R"({"name": "out", "op": "group_norm", "inputs": ["sum"], "attrs": {"groups": 3}})");
    });
  });
  b("G12", [] {
    return edit([](Parts& p) {
      json& n = p.graph["nodes"];
      std::string prev = "sum";
      for (int i = 0; i < 15; ++i) {
        const std::string name = "up" + std::to_string(i);
        n.push_back({{"name", name}, {"op", "upsample_nearest2x"}, {"inputs", {prev}}});
        prev = name;
      }
    });
  });
  b("G13", [] { return edit([](Parts& p) { p.graph["output"] = "sample"; }); });
  b("G14", [] {
    return edit([](Parts& p) {
      p.graph["nodes"].push_back(json::parse(R"({"name": "up", "op": "upsample_nearest2x", "inputs": ["out"]})"));
      p.graph["output"] = "up";
    });
  });
  // ---- class conditioning (format version 2)
  const auto conditional = [](Parts& p) {  // the class label's embedding added to the time embedding
    p.graph["inputs"]["class_labels"] = json::parse(R"({"kind": "scalar"})");
    p.graph["nodes"].insert(p.graph["nodes"].begin() + 1,
                            json::parse(R"({"name": "cemb", "op": "timestep_embedding", "inputs": ["class_labels"], "attrs": {"dim": 4}})"));
    p.graph["nodes"].insert(p.graph["nodes"].begin() + 2, json::parse(R"({"name": "both", "op": "add", "inputs": ["temb", "cemb"]})"));
    p.graph["nodes"][3]["inputs"] = json::array({"both"});
    p.meta["ddim.format_version"] = "2";
  };
  b("G15", [=] { return edit([=](Parts& p) { conditional(p); p.meta["ddim.format_version"] = "1"; }); });
  b("G16", [=] { return edit([=](Parts& p) { conditional(p); p.graph["inputs"]["class_labels"]["kind"] = "onehot"; }); });
  b("G17", [=] { return edit([=](Parts& p) { conditional(p); p.graph["nodes"][3]["inputs"] = json::array({"temb"}); }); });
  // ---- the schedule
  b("S1", [] { return edit([](Parts& p) { p.meta["ddim.schedule"] = "[1]"; }); });
  b("S2", [] { return edit([](Parts& p) { p.schedule["beta_max"] = 1; }); });
  b("S3", [] { return edit([](Parts& p) { p.schedule["beta_start"] = "small"; }); });
  b("S4", [] { return edit([](Parts& p) { p.schedule["prediction_type"] = "noise"; }); });
  b("S5", [] { return edit([](Parts& p) { p.schedule["beta_start"] = 0.5; p.schedule["beta_end"] = 0.1; }); });
  // ---- tensors against the graph and the schedule
  b("T1", [] { return edit([](Parts& p) { p.tensors.pop_back(); }); });
  b("T2", [] {
    return edit([](Parts& p) { p.tensors[0] = format::make_tensor_f32("proj.weight", {2, 2}, std::vector<float>(4, 0.f)); });
  });
  b("T3", [] {
    return edit([](Parts& p) {
      p.tensors[1] = {"proj.bias", format::DType::F64, {2}, std::vector<std::uint8_t>(16, 0)};
    });
  });
  b("T4", [] {
    return edit([](Parts& p) {
      p.graph["nodes"][3]["params"]["bias"] = "proj.bias";
      p.graph["nodes"][3]["params"]["weight"] = "out.weight";
    });
  });
  b("T5", [] { return edit([](Parts& p) { p.schedule["alphas_cumprod"] = "ac"; }); });
  b("T6", [] {
    return edit([](Parts& p) {
      p.schedule["alphas_cumprod"] = "ac";
      p.tensors.push_back(format::make_tensor_f32("ac", {3}, std::vector<float>(3, 0.5f)));
    });
  });
  b("T7", [] {
    return edit([](Parts& p) {
      p.schedule["alphas_cumprod"] = "ac";
      p.tensors.push_back(format::make_tensor_f32("ac", {1000}, std::vector<float>(1000, 0.5f), format::DType::F16));
    });
  });
  b("T8", [] {
    return edit([](Parts& p) {
      p.schedule["num_train_timesteps"] = 2;
      p.schedule["alphas_cumprod"] = "proj.bias";
    });
  });
  b("T9", [] { return edit([](Parts& p) { p.tensors.push_back(format::make_tensor_f32("ema.proj.weight", {1}, std::vector<float>{1.f})); }); });
  b("T10", [] {
    return edit([](Parts& p) { p.tensors[1] = format::make_tensor_f32("proj.bias", {2}, std::vector<float>{0.f, INFINITY}); });
  });
  b("T11", [] {
    return edit([](Parts& p) {
      p.schedule["alphas_cumprod"] = "ac";
      std::vector<float> ac(1000, 0.5f);
      ac[1] = 1.5f;
      p.tensors.push_back(format::make_tensor_f32("ac", {1000}, ac));
    });
  });
  // ---- latent models (section 9): the small VQ latent model of test_util.hpp, edited
  const auto latent = [](const std::function<void(std::map<std::string, std::string>&, std::vector<format::TensorData>&)>& f,
                         graph::DecoderConfig d = test::small_decoder("vq")) {
    const graph::BuiltUNet net = graph::build_unet2d(test::small_latent_unet());
    const graph::BuiltDecoder dec = graph::build_decoder(d);
    std::uint64_t state = 9;
    std::vector<format::TensorData> tensors;
    graph::append_random_tensors(net.params, state, format::DType::F32, tensors);
    graph::append_random_tensors(dec.params, state, format::DType::F32, tensors);
    auto meta = graph::make_latent_metadata(net.graph, ScheduleConfig{}, dec);
    f(meta, tensors);
    return format::serialize(tensors, meta);
  };
  const auto latent_json = [&](const char* key, const std::function<void(json&)>& f) {
    return latent([&](auto& m, auto&) {
      json j = json::parse(m[key]);
      f(j);
      m[key] = j.dump();
    });
  };
  b("L1", [&] { return latent([](auto& m, auto&) { m.erase("ddim.latent"); }); });
  b("L2", [&] { return latent([](auto& m, auto&) { m["ddim.format_version"] = "1"; }); });
  b("L3", [] {
    return edit([](Parts& p) {
      p.graph["nodes"][3] = {{"name", "out"}, {"op", "vector_quantize"}, {"inputs", {"sum"}}, {"attrs", {{"entries", 2}}},
                             {"params", {{"codebook", "out.weight"}}}};
      p.tensors[2] = format::make_tensor_f32("out.weight", {2, 2}, std::vector<float>{0.f, 1.f, 1.f, 0.f});
    });
  });
  b("L4", [&] { return latent_json("ddim.latent", [](json& j) { j["scaling_factor"] = 0; }); });
  b("L5", [&] { return latent_json("ddim.decoder", [](json& j) { j["inputs"]["timestep"] = json::object(); }); });
  b("L6", [&] {
    graph::DecoderConfig d = test::small_decoder("vq");
    d.latent_height = 4;
    return latent([](auto&, auto&) {}, d);
  });
  b("L7", [&] { return latent_json("ddim.latent", [](json& j) { j["factor"] = 4; }); });
  b("L8", [&] { return latent([](auto&, auto& t) { t.pop_back(); }); });
  return m;
}

}  // namespace

TEST_CASE("FORMAT.md: every documented rejection class gives the documented error, and every class is documented") {
  test::TempDir dir;
  const std::vector<Row> rows = documented_rows();
  REQUIRE(rows.size() >= 40);
  const auto files = hostile_files(dir);
  std::set<std::string> documented;
  for (const Row& row : rows) {
    CAPTURE(row.id);
    CHECK_MESSAGE(documented.insert(row.id).second, "row " << row.id << " appears twice");
    const auto it = files.find(row.id);
    if (it == files.end()) {
      FAIL_CHECK("FORMAT.md lists " << row.id << " but the test has no hostile file for it");
      continue;
    }
    const Outcome o = it->second();
    INFO("message: " << o.message);
    CHECK(test::contains(o.message, row.words));
    CHECK(o.code == (row.code == "Io" ? ErrorCode::Io : ErrorCode::InvalidFile));
    // One line, bounded.
    CHECK(o.message.find('\n') == std::string::npos);
    CHECK(o.message.size() < 2100);
  }
  for (const auto& [id, make] : files) CHECK_MESSAGE(documented.count(id) == 1, "class " << id << " is not in FORMAT.md");
}

TEST_CASE("hostile file messages are one bounded line: a million-entry schedule value, a huge op name with newlines") {
  // "beta_start": [0, 0, ... a million entries]: the message used to echo all of it (~2 MB).
  const std::vector<std::uint8_t> long_value = edit([](Parts& p) { p.schedule["beta_start"] = std::vector<int>(1000000, 0); });
  Outcome o = load_bytes(long_value);
  CHECK(o.code == ErrorCode::InvalidFile);
  CHECK(test::contains(o.message, "key 'beta_start' must be a number, got [0,0,0,"));
  CHECK(o.message.size() < 2100);
  // An op named by 100 kB of text with newlines in it.
  const std::vector<std::uint8_t> long_name = edit([](Parts& p) {
    std::string name;
    for (int i = 0; i < 10000; ++i) name += "line\nbreak ";
    p.graph["nodes"][3]["op"] = name;
  });
  o = load_bytes(long_name);
  INFO(o.message.substr(0, 300));
  CHECK(o.code == ErrorCode::InvalidFile);
  CHECK(o.message.find('\n') == std::string::npos);
  CHECK(test::contains(o.message, "line\\nbreak"));
  CHECK(o.message.size() < 2100);
}
