#include "plan/host_plan.hpp"

#include <algorithm>
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

// The time-only nodes run on the host's fp32 reference ops (engine/cpu), one row per timestep.
std::vector<std::vector<float>> evaluate_time_tables(const graph::Graph& g, const graph::TimeFolding& fold,
                                                     const std::vector<NodeWeights>& weights, std::span<const int> timesteps) {
  const int rows = int(timesteps.size());
  std::vector<std::vector<float>> vals(g.values.size());
  vals[g.timestep].assign(timesteps.begin(), timesteps.end());
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
