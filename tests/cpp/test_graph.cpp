// Graph IR: parsing errors, shape inference, time-only folding, the memory plan.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "cpu/cpu_backend.hpp"
#include "plan/host_plan.hpp"
#include "cpu/ops.hpp"
#include "ddim/ddim.hpp"
#include "graph/ir.hpp"
#include "graph/passes.hpp"
#include "graph/unet_builder.hpp"
#include "test_util.hpp"

using namespace ddim;
using nlohmann::json;

namespace {

json small_graph() {
  return json::parse(R"({
    "inputs": {"sample": {"channels": 3, "height": 8, "width": 8}, "timestep": {}},
    "output": "out",
    "nodes": [
      {"name": "temb", "op": "timestep_embedding", "inputs": ["timestep"], "attrs": {"dim": 8}},
      {"name": "proj", "op": "linear", "inputs": ["temb"], "attrs": {"out_features": 4}, "params": {"weight": "proj.weight"}},
      {"name": "conv", "op": "conv2d", "inputs": ["sample"], "attrs": {"out_channels": 4, "kernel": 3, "padding": 1},
       "params": {"weight": "conv.weight", "bias": "conv.bias"}},
      {"name": "sum", "op": "add", "inputs": ["conv", "proj"]},
      {"name": "out", "op": "conv2d", "inputs": ["sum"], "attrs": {"out_channels": 3, "kernel": [1, 1]},
       "params": {"weight": "out.weight"}}
    ]})");
}

void expect_graph_error(const json& j, const std::string& needle) {
  try {
    graph::parse_graph(j);
    FAIL("accepted a bad graph; expected an error mentioning: " << needle);
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::InvalidFile);
    INFO("message: " << e.what());
    CHECK(std::string(e.what()).find(needle) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("graph: a valid graph parses and its shapes are inferred") {
  auto g = graph::parse_graph(small_graph());
  CHECK(g.nodes.size() == 5);
  const auto& out = g.values[g.output];
  CHECK(out.kind == graph::Kind::Spatial);
  CHECK((out.c == 3 && out.h == 8 && out.w == 8));
  CHECK(g.values[g.find_value("proj")].kind == graph::Kind::Vector);
  auto reqs = graph::param_requirements(g);
  REQUIRE(reqs.size() == 4);
  CHECK(reqs[0].tensor == "proj.weight");
  CHECK(reqs[0].shapes[0] == std::vector<std::int64_t>{4, 8});
  CHECK(reqs[1].shapes[0] == std::vector<std::int64_t>{4, 3, 3, 3});
  // Non-square sizes the architecture admits.
  graph::infer_shapes(g, 5, 11);
  CHECK((g.values[g.output].h == 5 && g.values[g.output].w == 11));
}

TEST_CASE("graph: every malformed graph is rejected with the node and attribute named") {
  json j = small_graph();
  SUBCASE("unknown op") {
    j["nodes"][2]["op"] = "conv3d";
    expect_graph_error(j, "unknown op 'conv3d'");
  }
  SUBCASE("unknown attribute") {
    j["nodes"][2]["attrs"]["dilation"] = 2;
    expect_graph_error(j, "'conv' (conv2d) has unknown attribute 'dilation'");
  }
  SUBCASE("attribute of the wrong type") {
    j["nodes"][2]["attrs"]["out_channels"] = "four";
    expect_graph_error(j, "node 'conv' attribute 'out_channels' must be an integer");
  }
  SUBCASE("missing required attribute") {
    j["nodes"][2]["attrs"].erase("kernel");
    expect_graph_error(j, "node 'conv' attribute 'kernel' is required");
  }
  SUBCASE("unknown parameter role") {
    j["nodes"][2]["params"]["scale"] = "x";
    expect_graph_error(j, "unknown parameter role 'scale'");
  }
  SUBCASE("missing required parameter") {
    j["nodes"][4].erase("params");
    expect_graph_error(j, "'out' (conv2d) needs parameter 'weight'");
  }
  SUBCASE("input from a later node") {
    j["nodes"][3]["inputs"][0] = "out";
    expect_graph_error(j, "reads 'out', which is not an input or an earlier node");
  }
  SUBCASE("duplicate node name") {
    j["nodes"][3]["name"] = "conv";
    expect_graph_error(j, "node name 'conv' is used twice");
  }
  SUBCASE("wrong arity") {
    j["nodes"][3]["inputs"] = json::array({"conv"});
    expect_graph_error(j, "'sum' (add) takes 2 inputs, got 1");
  }
  SUBCASE("shape mismatch in add") {
    j["nodes"][1]["attrs"]["out_features"] = 5;
    expect_graph_error(j, "node 'sum' (add): cannot add (4, 8, 8) and (5)");
  }
  SUBCASE("group count not dividing channels") {
    j["nodes"].insert(j["nodes"].begin() + 3,
                      json::parse(R"({"name": "gn", "op": "group_norm", "inputs": ["conv"], "attrs": {"groups": 3}})"));
    expect_graph_error(j, "node 'gn' (group_norm): 4 channels are not divisible by 3 groups");
  }
  SUBCASE("unknown top-level key") {
    j["version"] = 2;
    expect_graph_error(j, "unknown top-level key 'version'");
  }
  SUBCASE("output that does not exist") {
    j["output"] = "nope";
    expect_graph_error(j, "output 'nope' is not a node");
  }
  SUBCASE("vector output") {
    j["output"] = "proj";
    expect_graph_error(j, "must be a spatial");
  }
  SUBCASE("odd size into avg_pool2x") {
    j["inputs"]["sample"]["height"] = 7;
    j["nodes"][4]["inputs"][0] = "pool";
    j["nodes"].insert(j["nodes"].begin() + 4, json::parse(R"({"name": "pool", "op": "avg_pool2x", "inputs": ["sum"]})"));
    expect_graph_error(j, "'pool' (avg_pool2x): input (4, 7, 8) has an odd H or W");
  }
}

TEST_CASE("graph: a caller's sample size that the architecture cannot take is an InvalidArgument naming the node") {
  auto model = test::tiny_model();
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.height = 15;  // the downsampler halves 15 to 8, the upsampler doubles to 16: the concat fails
  o.width = 12;
  try {
    Session::create(model, o);
    FAIL("accepted 15x12");
  } catch (const Error& e) {
    CHECK(e.code() == ErrorCode::InvalidArgument);
    CHECK(std::string(e.what()).find("15x12 does not fit the network") != std::string::npos);
    CHECK(std::string(e.what()).find("concat") != std::string::npos);
  }
  o.height = 32;
  o.width = 8;
  auto s = Session::create(model, o);  // any even size works for a two-level U-Net
  std::vector<float> x(3 * 32 * 8, 0.1f);
  std::vector<int> t{10};
  auto y = s->forward(x, t);
  CHECK(y.size() == x.size());
}

TEST_CASE("graph: the cifar10-32 builder has the published parameter count") {
  auto net = graph::build_unet2d(graph::UNetConfig::cifar10());
  CHECK(net.parameter_count() == 35746307);
  auto g = graph::parse_graph(net.graph);
  CHECK(g.values[g.output].c == 3);
}

TEST_CASE("graph: the celebahq-256 builder has the published parameter count") {
  auto net = graph::build_unet2d(graph::UNetConfig::celebahq256());
  CHECK(net.parameter_count() == 113673219);
  auto g = graph::parse_graph(net.graph);
  graph::infer_shapes(g, 256, 256);
  CHECK(g.values[g.output].c == 3);
  CHECK(g.values[g.output].h == 256);
}

TEST_CASE("graph: forward FLOPs count the per-step convolutions, by hand on the small graph") {
  auto g = graph::parse_graph(small_graph());
  graph::infer_shapes(g, 8, 8);
  const auto f = graph::fold_time_only(g);
  // conv 3x3, 3 -> 4 channels at 8x8: 2 * 4 * 64 * 3 * 9 = 13824; out 1x1, 4 -> 3: 2 * 3 * 64 * 4 =
  // 1536; the linear is time-only (folded), the add is elementwise: 15360 per sample.
  CHECK(graph::forward_flops(g, f, 1) == 15360.0);
  CHECK(graph::forward_flops(g, f, 3) == 3 * 15360.0);
}

TEST_CASE("time-only folding: only time nodes are folded and no step node depends on the timestep alone") {
  auto g = graph::parse_graph(graph::build_unet2d(graph::UNetConfig::cifar10()).graph);
  auto f = graph::fold_time_only(g);
  CHECK(f.time_nodes.size() + f.step_nodes.size() == g.nodes.size());
  // The time MLP (embedding, 2 linears, 2 silus) and every resnet's time projection.
  int resnets = 0;
  for (const auto& n : g.nodes) resnets += n.name.find(".time_emb_proj") != std::string::npos;
  CHECK(resnets == 22);
  CHECK(f.time_nodes.size() == std::size_t(5 + resnets));
  for (int i : f.step_nodes) {
    const auto& n = g.nodes[i];
    CHECK_MESSAGE(!f.time_only[n.output], n.name);
    CHECK_MESSAGE(n.op != graph::Op::TimestepEmbedding, n.name);
    CHECK_MESSAGE(n.op != graph::Op::Linear, n.name);
    bool reads_sample_side = false;
    for (int v : n.inputs) reads_sample_side |= !f.time_only[v] && v != g.timestep;
    CHECK_MESSAGE(reads_sample_side, n.name);
  }
  CHECK(f.tables.size() == std::size_t(resnets));  // each resnet's projection feeds one add
}

TEST_CASE("time-only folding: the folded forward equals the unfolded forward bitwise") {
  auto model = test::tiny_model(3);
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.batch = 3;
  o.threads = 2;
  cpu::CpuExecutor ex(ExecutorContext{model, 16, 12}, o);
  std::vector<float> x(3 * 3 * 16 * 12);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(std::sin(0.37 * double(i)));
  for (std::vector<int> t : {std::vector<int>{999}, std::vector<int>{0, 500, 999}, std::vector<int>{17, 17, 3}}) {
    std::vector<float> folded(x.size()), unfolded(x.size());
    ex.forward(x, t, folded);
    ex.forward_unfolded(x, t, unfolded);
    CHECK(std::memcmp(folded.data(), unfolded.data(), folded.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("memory plan: the planned arena is smaller than one buffer per value, and no two live values overlap") {
  auto g = graph::parse_graph(graph::build_unet2d(graph::UNetConfig::cifar10()).graph);
  auto f = graph::fold_time_only(g);
  auto plan = graph::plan_memory(g, f, 4, sizeof(float));
  MESSAGE("cifar10-32, batch 4: arena " << plan.arena_bytes / 1e6 << " MB vs " << plan.unplanned_bytes / 1e6 << " MB unplanned");
  CHECK(plan.arena_bytes < plan.unplanned_bytes / 4);
  // Independent overlap check: recompute lifetimes and compare every pair.
  const int S = int(f.step_nodes.size());
  std::vector<int> first(g.values.size(), -2), last(g.values.size(), -2);
  first[g.sample] = last[g.sample] = -1;
  for (int t : f.tables) first[t] = last[t] = -1;
  for (int p = 0; p < S; ++p) {
    const auto& n = g.nodes[f.step_nodes[p]];
    first[n.output] = last[n.output] = p;
    for (int in : n.inputs) last[in] = std::max(last[in], p);
  }
  last[g.output] = S;
  std::vector<int> live;
  for (std::size_t v = 0; v < g.values.size(); ++v)
    if (first[v] != -2) {
      REQUIRE(plan.offset[v] != graph::MemoryPlan::kNone);
      live.push_back(int(v));
    }
  int overlaps = 0;
  for (std::size_t a = 0; a < live.size(); ++a)
    for (std::size_t b = a + 1; b < live.size(); ++b) {
      int va = live[a], vb = live[b];
      bool time_overlap = !(last[va] < first[vb] || last[vb] < first[va]);
      std::size_t ea = plan.offset[va] + std::size_t(g.values[va].elements()) * 4 * 4;
      std::size_t eb = plan.offset[vb] + std::size_t(g.values[vb].elements()) * 4 * 4;
      bool mem_overlap = plan.offset[va] < eb && plan.offset[vb] < ea;
      overlaps += time_overlap && mem_overlap;
    }
  CHECK(overlaps == 0);
}

TEST_CASE("conv epilogue fusion: the fused graph run on the CPU equals the unfused forward bitwise") {
  // The CUDA backend's conv + add fusion (graph::fuse_conv_adds), checked where it can run: the
  // fused graph executed with the CPU ops (conv, then its epilogue adds in place) under the fused
  // graph's own memory plan, against the CPU backend's forward. A wrong rewrite, a missed read in
  // the liveness plan (an epilogue input overwritten early) or an aliased output shows here.
  graph::UNetConfig c = test::tiny_unet();
  c.block_out_channels = {16, 32, 32};
  c.down_attention = {false, true, false};
  c.layers_per_block = 2;
  auto model = Model::load_from_memory(graph::make_random_model_file(c, ScheduleConfig{}, 5), "fusion");
  const int n = 2, H = c.sample_height, W = c.sample_width;
  graph::Graph g0 = model->impl().graph;
  graph::infer_shapes(g0, H, W);
  const graph::FusedGraph fused = graph::fuse_conv_adds(g0);
  const graph::Graph& g = fused.graph;
  int temb = 0, residual = 0;
  for (const auto& f : fused.fusion) temb += f.temb >= 0, residual += f.residual >= 0;
  MESSAGE("fused adds: " << temb << " time-embedding, " << residual << " residual, of " << g0.nodes.size() << " nodes");
  CHECK(fused.fused_adds == temb + residual);
  CHECK(g.nodes.size() == g0.nodes.size() - std::size_t(fused.fused_adds));
  CHECK(temb == 3 * 2 + 1 * 2 + 3 * 3);  // every resnet's conv1 (down 3x2, mid 2, up 3x3)
  CHECK(residual > 0);

  const graph::TimeFolding fold = graph::fold_time_only(g);
  const graph::MemoryPlan mem = graph::plan_memory(g, fold, n, sizeof(float), 256, {g.sample});
  const std::vector<plan::NodeWeights> all = plan::resolve_node_weights(model->impl().graph, model->impl());
  std::vector<plan::NodeWeights> weights;
  for (int i : fused.node_of) weights.push_back(all[std::size_t(i)]);
  const std::vector<int> t{700, 12};
  const std::vector<int> distinct{12, 700};
  const auto tables = plan::evaluate_time_tables(g, fold, weights, distinct);

  std::vector<float> arena(mem.arena_bytes / sizeof(float), std::nanf(""));
  auto at = [&](int v) {
    REQUIRE(mem.offset[v] != graph::MemoryPlan::kNone);
    return arena.data() + mem.offset[v] / sizeof(float);
  };
  std::vector<float> x(std::size_t(n) * 3 * H * W);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = float(std::cos(0.11 * double(i)));
  std::copy(x.begin(), x.end(), at(g.sample));
  for (int v : fold.tables) {
    const std::size_t ch = std::size_t(g.values[v].c);
    for (int b = 0; b < n; ++b)
      std::copy_n(tables[v].data() + (t[std::size_t(b)] == 12 ? 0 : 1) * ch, ch, at(v) + std::size_t(b) * ch);
  }
  std::vector<float> scratch(1 << 22);
  for (int i : fold.step_nodes) {
    const graph::Node& node = g.nodes[i];
    const graph::ConvFusion& f = fused.fusion[std::size_t(i)];
    std::vector<const float*> in;
    for (int v : node.inputs) in.push_back(at(v));
    float* y = at(node.output);
    for (int v : node.inputs)  // the plan never lets an output share bytes with an input
      CHECK_MESSAGE((mem.offset[v] + std::size_t(g.values[v].elements()) * n * 4 <= mem.offset[node.output] ||
                     mem.offset[node.output] + std::size_t(g.values[node.output].elements()) * n * 4 <= mem.offset[v]),
                    node.name);
    cpu::run_node(g, node, weights[std::size_t(i)], n, in, y, scratch.data(), nullptr);
    const graph::Value& yv = g.values[node.output];
    if (f.temb >= 0) cpu::add_broadcast(y, at(f.temb), n, yv.c, yv.h * yv.w, 1.f, y);
    if (f.residual >= 0) cpu::add(y, at(f.residual), std::size_t(n) * std::size_t(yv.elements()), 1.f, y);
  }
  const std::vector<float> fused_out(at(g.output), at(g.output) + x.size());
  const std::vector<float> ref = test::cpu_session(model, n)->forward(x, t);
  CHECK(std::memcmp(fused_out.data(), ref.data(), ref.size() * sizeof(float)) == 0);
}

TEST_CASE("graph: a hostile graph cannot grow values past the size limits") {
  json j = small_graph();
  auto& nodes = j["nodes"];
  std::string prev = "sum";
  for (int i = 0; i < 20; ++i) {
    std::string name = "up" + std::to_string(i);
    nodes.push_back({{"name", name}, {"op", "upsample_nearest2x"}, {"inputs", {prev}}});
    prev = name;
  }
  expect_graph_error(j, "exceeds the size limits");
}
