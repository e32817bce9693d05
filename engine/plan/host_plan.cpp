#include "plan/host_plan.hpp"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <string>

#include "cpu/cpu_backend.hpp"
#include "ddim/error.hpp"

namespace ddim::plan {

std::vector<NodeWeights> resolve_node_weights(const graph::Graph& g, const Model::Impl& m) {
  static constexpr const char* kRoleNames[kRoleCount] = {"weight",   "bias",     "q_weight", "q_bias",     "k_weight",
                                                         "k_bias",   "v_weight", "v_bias",   "out_weight", "out_bias"};
  std::vector<NodeWeights> weights(g.nodes.size(), NodeWeights{});
  for (std::size_t i = 0; i < g.nodes.size(); ++i)
    for (const auto& p : g.nodes[i].params) {
      // vector_quantize's codebook (entries, c) is its weight.
      const std::string role = p.role == "codebook" ? std::string("weight") : p.role;
      const auto r = std::find(std::begin(kRoleNames), std::end(kRoleNames), role);
      if (r == std::end(kRoleNames)) throw Error(ErrorCode::Internal, "unknown parameter role '" + p.role + "'");
      weights[i][std::size_t(r - std::begin(kRoleNames))] = m.weight(p.tensor);
    }
  return weights;
}

std::size_t condition_count(const graph::Graph& g, std::span<const float> conditions) {
  const std::size_t width = std::size_t(g.cls.width());
  if (width == 0) {
    if (!conditions.empty()) throw Error(ErrorCode::Internal, "conditions given for an unconditional graph");
    return 1;
  }
  if (conditions.empty() || conditions.size() % width != 0)
    throw Error(ErrorCode::Internal, "conditions: " + std::to_string(conditions.size()) + " values for width " + std::to_string(width));
  return conditions.size() / width;
}

// The time-only nodes run on the host's fp32 reference ops (engine/cpu), one row per (timestep,
// condition). Each row is computed independently of the others (the ops are row by row), so a
// row's values do not depend on which other timesteps or conditions share the table.
std::vector<std::vector<float>> evaluate_time_tables(const graph::Graph& g, const graph::TimeFolding& fold,
                                                     const std::vector<NodeWeights>& weights, std::span<const int> timesteps,
                                                     std::span<const float> conditions) {
  const std::size_t U = condition_count(g, conditions), width = std::size_t(g.cls.width());
  const int rows = int(timesteps.size() * U);
  std::vector<std::vector<float>> vals(g.values.size());
  vals[g.timestep].reserve(std::size_t(rows));
  for (int t : timesteps) vals[g.timestep].insert(vals[g.timestep].end(), U, float(t));
  if (g.class_labels >= 0) {
    for (std::size_t u = 0; u < U; ++u) {
      const float* c = conditions.data() + u * width;
      if (g.cls.kind == graph::ClassKind::Index &&
          !(c[0] >= 0.f && c[0] < float(g.cls.num_classes) && c[0] == std::floor(c[0])))
        throw Error(ErrorCode::InvalidArgument, "class label " + std::to_string(double(c[0])) + " is not an integer in [0, " +
                                                    std::to_string(g.cls.num_classes) + ") (the model's num_classes is " +
                                                    std::to_string(g.cls.num_classes) + ")");
    }
    vals[g.class_labels].reserve(std::size_t(rows) * width);
    for (std::size_t s = 0; s < timesteps.size(); ++s) vals[g.class_labels].insert(vals[g.class_labels].end(), conditions.begin(), conditions.end());
  }
  std::vector<const float*> in;
  for (int i : fold.time_nodes) {
    const graph::Node& n = g.nodes[i];
    in.clear();
    for (int v : n.inputs) in.push_back(vals[v].data());
    vals[n.output].assign(std::size_t(rows) * std::size_t(g.values[n.output].elements()), 0.f);
    cpu::run_node(g, n, weights[std::size_t(i)], rows, in, vals[n.output].data(), nullptr, nullptr);
  }
  std::vector<std::vector<float>> tables(g.values.size());
  for (int v : fold.tables) tables[v] = std::move(vals[v]);
  return tables;
}

}  // namespace ddim::plan
