#pragma once
// Host-side planning that every backend shares: a node's parameters resolved once per plan, and
// the folded time tables (graph/passes.hpp: everything that depends only on the timestep),
// evaluated on the host in fp32 once per schedule. The CPU backend reads the tables directly; the
// CUDA backend uploads them.
#include <array>
#include <span>
#include <vector>

#include "graph/passes.hpp"
#include "model_impl.hpp"

namespace ddim::plan {

// Parameter roles of the IR (graph/ir.cpp): a node's parameter pointers, resolved once per plan.
enum Role { kWeight, kBias, kQWeight, kQBias, kKWeight, kKBias, kVWeight, kVBias, kOutWeight, kOutBias, kRoleCount };
using NodeWeights = std::array<const float*, kRoleCount>;
// (vector_quantize's codebook is its kWeight.)
// Resolves every node's parameters to pointers into the model's fp32 weights (null where absent).
std::vector<NodeWeights> resolve_node_weights(const graph::Graph& g, const Model::Impl& m);

// The folded time tables, fp32: for every value in folding.tables, rows x C values, one row per
// entry of `timesteps` (other values empty). `weights` is indexed like g's nodes. For a graph
// with class_labels: `conditions` holds U conditions of g.cls.width() values each, and the tables
// have one row per (timestep s, condition u), row s * U + u; an unconditional graph takes none
// (U = 1). An index label outside [0, num_classes) throws InvalidArgument naming it.
std::vector<std::vector<float>> evaluate_time_tables(const graph::Graph& g, const graph::TimeFolding& folding,
                                                     const std::vector<NodeWeights>& weights, std::span<const int> timesteps,
                                                     std::span<const float> conditions = {});
// The number of conditions in `conditions` for g (1 for an unconditional graph).
std::size_t condition_count(const graph::Graph& g, std::span<const float> conditions);

}  // namespace ddim::plan
