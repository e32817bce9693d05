#pragma once
// Plan-time passes over the IR: time-only folding and the liveness-based memory plan.
#include <cstddef>
#include <vector>

#include "graph/ir.hpp"

namespace ddim::graph {

// Time-only (conditioning-only) folding. A value is time-only when it depends on the `timestep`
// input or the `class_labels` input and not on `sample` (the sinusoidal embedding, the time MLP,
// the class embedding added to it, every resnet's time projection). Those nodes are evaluated once
// per set of timesteps (a sampling schedule, an inversion, one forward) and distinct conditions
// into tables with one row per (timestep, condition); the per-step forward starts from table rows.
// An unconditional graph has one condition: one row per timestep.
struct TimeFolding {
  std::vector<char> time_only;   // per value
  std::vector<char> per_label;   // per value: time-only and depends on class_labels
  std::vector<int> time_nodes;   // evaluated into tables, in graph order
  std::vector<int> step_nodes;   // evaluated every step, in graph order
  std::vector<int> tables;       // time-only values that per-step nodes read (the table values)
};
// Throws ddim::Error(InvalidFile) when the output does not depend on the sample.
TimeFolding fold_time_only(const Graph& g);

// Memory plan of the per-step forward: every value a step touches (the sample, the table rows,
// every step node's output) gets an offset in one arena; two values share bytes only when their
// lifetimes (first write .. last read, in step-node order) do not overlap. The output lives to
// the end. Greedy best fit, largest buffers first.
struct MemoryPlan {
  static constexpr std::size_t kNone = static_cast<std::size_t>(-1);
  std::vector<std::size_t> offset;  // bytes, per value; kNone for values outside the arena
  std::size_t arena_bytes = 0;      // planned peak
  std::size_t unplanned_bytes = 0;  // the sum of all buffers (what one buffer per value costs)
};
// keep_alive: values that must also live to the end (e.g. the sample, when a backend writes the
// next step's input while reading the output).
MemoryPlan plan_memory(const Graph& g, const TimeFolding& folding, int batch, std::size_t element_bytes,
                       std::size_t alignment = 256, const std::vector<int>& keep_alive = {});

// Convolution epilogue fusion, for backends whose convolution can add a per-channel vector and
// a same-shape tensor to its output (the CUDA backend through cuDNN). A conv2d is merged with the
// add that immediately follows it in step order when that add has divisor 1, reads the conv's
// output, and nothing else does: the resnet's time-embedding add (the other input is a time-only
// vector: `temb`) and its residual add (a spatial value of the conv's output shape: `residual`).
// The fused conv gets the other input appended to its inputs and writes the add's output value;
// the add disappears. Run before the memory plan, so liveness sees every read. The fused graph
// keeps the original's values; node_of maps each fused node to its node in the original graph.
struct ConvFusion {
  int temb = -1, residual = -1;  // value indices (-1: none)
};
struct FusedGraph {
  Graph graph;
  std::vector<int> node_of;        // per fused node: the original node index
  std::vector<ConvFusion> fusion;  // per fused node
  int fused_adds = 0;
};
FusedGraph fuse_conv_adds(const Graph& g);

// Floating-point operations of one per-step forward of `batch` samples (time-only nodes excluded):
// 2 per multiply-add of convolutions (unpadded channel counts), linear layers and attention
// (q/k/v/out projections, q k^T and the weighted sum of v); elementwise work is not counted.
double forward_flops(const Graph& g, const TimeFolding& folding, int batch);

}  // namespace ddim::graph
