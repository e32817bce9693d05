// weights/FORMAT.md stays true: its example blocks (```json graph-example, ```json schedule-example,
// ```text tensors-example, ```text timesteps-example) are extracted and checked against the reader.
#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ddim/error.hpp"
#include "ddim/model.hpp"
#include "ddim/schedule.hpp"
#include "format/container.hpp"
#include "format/model_metadata.hpp"
#include "graph/ir.hpp"

namespace {

using Shape = std::vector<std::int64_t>;

// This file is <repo>/tests/cpp/test_format_doc.cpp.
std::filesystem::path format_doc_path() {
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path() / "weights" / "FORMAT.md";
}

std::string read_format_doc() {
  const std::filesystem::path path = format_doc_path();
  std::ifstream f(path, std::ios::binary);
  REQUIRE_MESSAGE(f.good(), "cannot open " << path.string());
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return {};
  const auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

// The body of the one fenced block whose opening line is "```<tag>" (e.g. "json graph-example").
std::string fenced_block(const std::string& doc, const std::string& tag) {
  std::istringstream in(doc);
  std::string line, body;
  int found = 0;
  bool inside = false;
  while (std::getline(in, line)) {
    const std::string t = trim(line);
    if (inside) {
      if (t == "```") {
        inside = false;
        continue;
      }
      body += line + "\n";
    } else if (t == "```" + tag) {
      inside = true;
      ++found;
    }
  }
  REQUIRE_MESSAGE(found == 1, "FORMAT.md must hold exactly one ```" << tag << " block, found " << found);
  REQUIRE_MESSAGE(!inside, "the ```" << tag << " block is not closed");
  return body;
}

// "name [d0, d1, ...]" lines.
std::vector<std::pair<std::string, Shape>> documented_tensors(const std::string& doc) {
  std::vector<std::pair<std::string, Shape>> out;
  std::istringstream in(fenced_block(doc, "text tensors-example"));
  std::string line;
  while (std::getline(in, line)) {
    line = trim(line);
    if (line.empty()) continue;
    const auto space = line.find(' ');
    REQUIRE_MESSAGE(space != std::string::npos, "tensors-example line without a shape: " << line);
    const nlohmann::json shape = nlohmann::json::parse(line.substr(space + 1));
    REQUIRE(shape.is_array());
    out.emplace_back(line.substr(0, space), shape.get<Shape>());
  }
  return out;
}

std::int64_t numel(const Shape& s) {
  std::int64_t n = 1;
  for (const auto d : s) n *= d;
  return n;
}

struct DocExample {
  std::string graph_text, schedule_text;
  std::vector<std::pair<std::string, Shape>> tensors;
};

DocExample doc_example() {
  const std::string doc = read_format_doc();
  return {fenced_block(doc, "json graph-example"), fenced_block(doc, "json schedule-example"), documented_tensors(doc)};
}

// A model file from the documented example: every documented tensor (small finite values) and the
// graph and schedule text verbatim, plus `extra_meta`.
std::vector<std::uint8_t> example_file(const DocExample& ex, const std::map<std::string, std::string>& extra_meta = {},
                                       const std::vector<std::pair<std::string, Shape>>& extra_tensors = {}) {
  std::vector<ddim::format::TensorData> tensors;
  auto add = [&](const std::string& name, const Shape& shape) {
    std::vector<float> values(static_cast<std::size_t>(numel(shape)));
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = 0.01f * static_cast<float>(static_cast<int>(i % 13) - 6);
    tensors.push_back(ddim::format::make_tensor_f32(name, shape, values));
  };
  for (const auto& [name, shape] : ex.tensors) add(name, shape);
  for (const auto& [name, shape] : extra_tensors) add(name, shape);
  std::map<std::string, std::string> meta = {
      {"ddim.format_version", "1"}, {"ddim.graph", ex.graph_text}, {"ddim.schedule", ex.schedule_text}};
  for (const auto& [k, v] : extra_meta) meta[k] = v;
  return ddim::format::serialize(tensors, meta);
}

std::string load_error(const std::vector<std::uint8_t>& bytes) {
  try {
    ddim::Model::load_from_memory(bytes, "doc-example");
  } catch (const ddim::Error& e) {
    CHECK(e.code() == ddim::ErrorCode::InvalidFile);
    return e.what();
  }
  return {};
}

}  // namespace

TEST_CASE("FORMAT.md: the graph example parses, infers shapes and needs exactly the documented tensors") {
  const DocExample ex = doc_example();
  ddim::graph::Graph g =
      ddim::graph::parse_graph(ddim::format::parse_json_strict(ex.graph_text, "FORMAT.md graph-example"));

  CHECK(g.nodes.size() == 17);
  CHECK(g.in_channels == 3);
  CHECK(g.height == 8);
  CHECK(g.width == 8);
  const ddim::graph::Value& out = g.values[static_cast<std::size_t>(g.output)];
  CHECK(out.name == "conv_out");
  CHECK(out.kind == ddim::graph::Kind::Spatial);
  CHECK(out.c == 3);
  CHECK(out.h == 8);
  CHECK(out.w == 8);

  std::map<std::string, int> ops;
  for (const auto& n : g.nodes) ops[ddim::graph::to_string(n.op)] += 1;
  CHECK(ops["timestep_embedding"] == 1);
  CHECK(ops["linear"] == 3);
  CHECK(ops["silu"] == 2);
  CHECK(ops["conv2d"] == 4);
  CHECK(ops["group_norm"] == 4);
  CHECK(ops["add"] == 2);
  CHECK(ops["attention"] == 1);

  // The shapes the text states.
  const auto value = [&](const char* name) -> const ddim::graph::Value& {
    const int v = g.find_value(name);
    REQUIRE(v >= 0);
    return g.values[static_cast<std::size_t>(v)];
  };
  CHECK(value("time_proj").kind == ddim::graph::Kind::Vector);
  CHECK(value("time_proj").c == 32);
  CHECK(value("time_embedding.silu_out").c == 128);
  CHECK(value("block.time_emb_proj").c == 32);
  CHECK(value("attn").c == 32);
  CHECK(value("attn").h == 8);
  const ddim::graph::Node& attn = g.nodes[static_cast<std::size_t>(value("attn").producer)];
  CHECK(attn.heads == 2);
  CHECK(attn.inputs.size() == 2);

  // param_requirements lists exactly the documented tensors, each with an accepted shape.
  const auto reqs = ddim::graph::param_requirements(g);
  CHECK(reqs.size() == ex.tensors.size());
  std::map<std::string, Shape> documented(ex.tensors.begin(), ex.tensors.end());
  CHECK(documented.size() == ex.tensors.size());  // no name listed twice
  std::set<std::string> required;
  std::int64_t parameters = 0;
  for (const auto& r : reqs) {
    INFO("tensor " << r.tensor << " (role " << r.role << ")");
    required.insert(r.tensor);
    const auto it = documented.find(r.tensor);
    REQUIRE(it != documented.end());
    CHECK(std::find(r.shapes.begin(), r.shapes.end(), it->second) != r.shapes.end());
    parameters += numel(it->second);
  }
  for (const auto& [name, shape] : ex.tensors) {
    INFO("documented tensor " << name);
    CHECK(required.count(name) == 1);
  }
  CHECK(parameters == 49603);

  // "admits every image size": shapes infer at other sizes too.
  CHECK_NOTHROW(ddim::graph::infer_shapes(g, 5, 7));
  CHECK(g.values[static_cast<std::size_t>(g.output)].h == 5);
  CHECK(g.values[static_cast<std::size_t>(g.output)].w == 7);
  CHECK_NOTHROW(ddim::graph::infer_shapes(g, 64, 48));
}

TEST_CASE("FORMAT.md: the schedule example parses to diffusers' DDIMScheduler defaults") {
  const DocExample ex = doc_example();
  const ddim::format::ParsedSchedule s =
      ddim::format::parse_schedule(ddim::format::parse_json_strict(ex.schedule_text, "FORMAT.md schedule-example"));
  const ddim::ScheduleConfig& c = s.config;
  CHECK_FALSE(s.alphas_cumprod_tensor.has_value());
  CHECK(c.num_train_timesteps == 1000);
  CHECK(c.beta_schedule == ddim::BetaSchedule::Linear);
  CHECK(c.beta_start == 0.0001);
  CHECK(c.beta_end == 0.02);
  CHECK_FALSE(c.rescale_betas_zero_snr);
  CHECK(c.prediction_type == ddim::PredictionType::Epsilon);
  CHECK(c.timestep_spacing == ddim::Spacing::Leading);
  CHECK(c.steps_offset == 0);
  CHECK(c.clip_sample);
  CHECK(c.clip_sample_range == 1.0);
  CHECK(c.set_alpha_to_one);
  CHECK_FALSE(c.thresholding);
  CHECK(c.dynamic_thresholding_ratio == 0.995);
  CHECK(c.sample_max_value == 1.0);
  CHECK(c.variance_type == ddim::VarianceType::FixedSmall);

  // The document says the example is all defaults: {} means the same schedule.
  const nlohmann::json all = ddim::format::schedule_to_json(c);
  const nlohmann::json empty = ddim::format::schedule_to_json(ddim::format::parse_schedule(nlohmann::json::object()).config);
  CHECK(all == empty);
  // Every key of the example is one the writer writes, and vice versa.
  const nlohmann::json example = nlohmann::json::parse(ex.schedule_text);
  CHECK(example.size() == all.size());
  for (auto it = all.begin(); it != all.end(); ++it) CHECK_MESSAGE(example.contains(it.key()), it.key());

  // Unknown keys are errors.
  CHECK_THROWS_AS(ddim::format::parse_schedule(nlohmann::json{{"num_inference_steps", 50}}), ddim::Error);
}

TEST_CASE("FORMAT.md: the documented timestep sequences are ddim::Scheduler's") {
  const std::string doc = read_format_doc();
  std::istringstream in(fenced_block(doc, "text timesteps-example"));
  const ddim::Scheduler scheduler{ddim::ScheduleConfig{}};
  std::string line;
  int lines = 0;
  while (std::getline(in, line)) {
    line = trim(line);
    if (line.empty()) continue;
    INFO(line);
    ++lines;
    std::istringstream ls(line);
    std::string spacing, steps;
    ls >> spacing >> steps;
    REQUIRE(!steps.empty());
    REQUIRE(steps.back() == ':');
    std::vector<int> expected;
    for (int t = 0; ls >> t;) expected.push_back(t);
    const ddim::TimestepPlan plan = scheduler.timesteps(std::stoi(steps), ddim::parse_spacing(spacing));
    CHECK(plan.timesteps == expected);
  }
  CHECK(lines >= 6);
}

TEST_CASE("FORMAT.md: the example model file loads, and the documented load rules hold") {
  const DocExample ex = doc_example();
  std::int64_t parameters = 0;
  for (const auto& [name, shape] : ex.tensors) parameters += numel(shape);

  // Non-ddim metadata keys (e.g. "format": "pt") are allowed.
  const std::vector<std::uint8_t> bytes = example_file(ex, {{"format", "pt"}});
  const auto model = ddim::Model::load_from_memory(bytes, "doc-example");
  const ddim::ModelInfo& info = model->info();
  CHECK(info.format_version == 1);
  CHECK(info.in_channels == 3);
  CHECK(info.out_channels == 3);
  CHECK(info.height == 8);
  CHECK(info.width == 8);
  CHECK(info.node_count == 17);
  CHECK(info.parameter_count == parameters);
  CHECK(model->schedule().num_train_timesteps == 1000);

  SUBCASE("an unreferenced tensor is rejected") {
    const std::string e = load_error(example_file(ex, {}, {{"block.unused.weight", {4}}}));
    CHECK(e.find("block.unused.weight") != std::string::npos);
  }
  SUBCASE("an unknown ddim.* key is rejected") {
    const std::string e = load_error(example_file(ex, {{"ddim.extra", "1"}}));
    CHECK(e.find("ddim.extra") != std::string::npos);
  }
  SUBCASE("a newer format version asks to upgrade ddim") {
    const std::string e = load_error(example_file(ex, {{"ddim.format_version", "3"}}));
    CHECK(e.find("upgrade ddim") != std::string::npos);
  }
  SUBCASE("an explicit alphas_cumprod table is an F64 tensor of shape [T]") {
    nlohmann::json schedule = nlohmann::json::parse(ex.schedule_text);
    schedule["alphas_cumprod"] = "alphas_cumprod";
    std::vector<ddim::format::TensorData> tensors;
    for (const auto& [name, shape] : ex.tensors) {
      const std::vector<float> values(static_cast<std::size_t>(numel(shape)), 0.01f);
      tensors.push_back(ddim::format::make_tensor_f32(name, shape, values));
    }
    ddim::format::TensorData table{"alphas_cumprod", ddim::format::DType::F64, {1000}, {}};
    for (int t = 0; t < 1000; ++t) {
      const double a = 1.0 - 0.0009 * t;
      const auto bits = std::bit_cast<std::uint64_t>(a);
      for (int b = 0; b < 8; ++b) table.bytes.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
    }
    tensors.push_back(std::move(table));
    const auto file = ddim::format::serialize(
        tensors, {{"ddim.format_version", "1"}, {"ddim.graph", ex.graph_text}, {"ddim.schedule", schedule.dump()}});
    const auto m = ddim::Model::load_from_memory(file, "doc-example-alphas");
    REQUIRE(m->schedule().alphas_cumprod.size() == 1000);
    CHECK(m->schedule().alphas_cumprod[10] == 1.0 - 0.0009 * 10);
    CHECK(m->info().parameter_count == parameters);  // the table is not a parameter
  }
}
