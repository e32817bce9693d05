#include "graph/passes.hpp"

#include <algorithm>
#include <limits>

#include "ddim/error.hpp"

namespace ddim::graph {

TimeFolding fold_time_only(const Graph& g) {
  const std::size_t nv = g.values.size();
  std::vector<char> dep_time(nv, 0), dep_sample(nv, 0), dep_label(nv, 0);
  dep_time[g.timestep] = 1;
  dep_sample[g.sample] = 1;
  if (g.class_labels >= 0) dep_time[g.class_labels] = dep_label[g.class_labels] = 1;
  // Until nothing changes: a fused graph (fuse_conv_adds) may read a value produced by a later
  // node (a convolution that took over its time-embedding add reads that add's projection).
  for (bool changed = true; changed;) {
    changed = false;
    for (const Node& n : g.nodes)
      for (int i : n.inputs) {
        const char t = dep_time[n.output] | dep_time[i], s = dep_sample[n.output] | dep_sample[i],
                   l = dep_label[n.output] | dep_label[i];
        changed |= t != dep_time[n.output] || s != dep_sample[n.output] || l != dep_label[n.output];
        dep_time[n.output] = t;
        dep_sample[n.output] = s;
        dep_label[n.output] = l;
      }
  }
  TimeFolding f;
  f.time_only.assign(nv, 0);
  f.per_label.assign(nv, 0);
  for (std::size_t v = 0; v < nv; ++v) {
    f.time_only[v] = dep_time[v] && !dep_sample[v];
    f.per_label[v] = f.time_only[v] && dep_label[v];
  }
  if (g.class_labels >= 0 && !dep_label[g.output])
    throw Error(ErrorCode::InvalidFile, "graph: the output '" + g.values[g.output].name +
                                            "' does not depend on the input 'class_labels' (re-export the model)");
  if (!dep_sample[g.output])
    throw Error(ErrorCode::InvalidFile, "graph: the output '" + g.values[g.output].name +
                                            "' does not depend on the input 'sample' (re-export the model)");
  std::vector<char> is_table(nv, 0);
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    if (f.time_only[n.output]) {
      f.time_nodes.push_back(int(i));
      continue;
    }
    // Nodes that depend on neither input (none exist in valid graphs: every op has an input)
    // run per step with the rest.
    f.step_nodes.push_back(int(i));
    for (int in : n.inputs)
      if (f.time_only[in] && !is_table[in]) {
        is_table[in] = 1;
        f.tables.push_back(in);
      }
  }
  return f;
}

MemoryPlan plan_memory(const Graph& g, const TimeFolding& f, int batch, std::size_t element_bytes, std::size_t alignment,
                       const std::vector<int>& keep_alive) {
  const std::size_t nv = g.values.size();
  constexpr int kUnused = std::numeric_limits<int>::min();
  std::vector<int> first(nv, kUnused), last(nv, kUnused);
  // Position -1: before the first step node (the sample and the table rows are written then).
  first[g.sample] = last[g.sample] = -1;
  for (int t : f.tables) first[t] = last[t] = -1;
  for (std::size_t p = 0; p < f.step_nodes.size(); ++p) {
    const Node& n = g.nodes[f.step_nodes[p]];
    first[n.output] = last[n.output] = int(p);
    for (int in : n.inputs) last[in] = std::max(last[in], int(p));
  }
  last[g.output] = int(f.step_nodes.size());
  for (int v : keep_alive)
    if (first[v] != kUnused) last[v] = int(f.step_nodes.size());

  struct Item {
    int value;
    std::size_t bytes;
  };
  std::vector<Item> items;
  MemoryPlan plan;
  plan.offset.assign(nv, MemoryPlan::kNone);
  for (std::size_t v = 0; v < nv; ++v) {
    if (first[v] == kUnused) continue;
    std::size_t bytes = std::size_t(g.values[v].elements()) * std::size_t(batch) * element_bytes;
    bytes = (bytes + alignment - 1) / alignment * alignment;
    items.push_back({int(v), bytes});
    plan.unplanned_bytes += bytes;
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.bytes > b.bytes; });
  struct Placed {
    std::size_t begin, end;
    int first, last;
  };
  std::vector<Placed> placed;
  for (const Item& it : items) {
    // Intervals already placed whose lifetimes overlap this one, by offset.
    std::vector<std::pair<std::size_t, std::size_t>> busy;
    for (const Placed& p : placed)
      if (!(p.last < first[it.value] || last[it.value] < p.first)) busy.push_back({p.begin, p.end});
    std::sort(busy.begin(), busy.end());
    // Best fit: the smallest gap that holds the buffer; else after the last busy interval.
    std::size_t best = MemoryPlan::kNone, best_gap = MemoryPlan::kNone, cursor = 0;
    for (const auto& [b, e] : busy) {
      if (b > cursor && b - cursor >= it.bytes && b - cursor < best_gap) {
        best = cursor;
        best_gap = b - cursor;
      }
      cursor = std::max(cursor, e);
    }
    if (best == MemoryPlan::kNone) best = cursor;
    placed.push_back({best, best + it.bytes, first[it.value], last[it.value]});
    plan.offset[it.value] = best;
    plan.arena_bytes = std::max(plan.arena_bytes, best + it.bytes);
  }
  return plan;
}

FusedGraph fuse_conv_adds(const Graph& g) {
  const TimeFolding fold = fold_time_only(g);
  std::vector<int> readers(g.values.size(), 0);
  for (const Node& n : g.nodes)
    for (int v : n.inputs) ++readers[v];
  FusedGraph out;
  out.graph = g;
  Graph& fg = out.graph;
  std::vector<char> drop(g.nodes.size(), 0);
  std::vector<ConvFusion> fusion(g.nodes.size());
  for (std::size_t p = 0; p + 1 < fold.step_nodes.size(); ++p) {
    const int ci = fold.step_nodes[p], ai = fold.step_nodes[p + 1];
    Node& conv = fg.nodes[ci];
    const Node& add = g.nodes[ai];
    if (conv.op != Op::Conv2d || add.op != Op::Add || add.divisor != 1.0 || readers[conv.output] != 1 || conv.output == g.output)
      continue;
    const int other = add.inputs[0] == conv.output ? add.inputs[1] : add.inputs[1] == conv.output ? add.inputs[0] : -1;
    if (other < 0 || other == conv.output) continue;
    const Value& ov = g.values[other];
    const Value& cv = g.values[conv.output];
    if (ov.kind == Kind::Vector && fold.time_only[other] && ov.c == cv.c) fusion[ci].temb = other;
    else if (ov.kind == Kind::Spatial && ov.c == cv.c && ov.h == cv.h && ov.w == cv.w) fusion[ci].residual = other;
    else continue;
    conv.inputs.push_back(other);
    conv.output = add.output;
    drop[ai] = 1;
    ++out.fused_adds;
  }
  std::vector<Node> kept;
  for (std::size_t i = 0; i < fg.nodes.size(); ++i) {
    if (drop[i]) continue;
    out.node_of.push_back(int(i));
    out.fusion.push_back(fusion[i]);
    kept.push_back(std::move(fg.nodes[i]));
  }
  fg.nodes = std::move(kept);
  for (std::size_t i = 0; i < fg.nodes.size(); ++i) fg.values[fg.nodes[i].output].producer = int(i);
  return out;
}

double forward_flops(const Graph& g, const TimeFolding& f, int batch) {
  double total = 0;
  for (int i : f.step_nodes) {
    const Node& n = g.nodes[i];
    const Value& x = g.values[n.inputs[0]];
    const Value& y = g.values[n.output];
    switch (n.op) {
      case Op::Conv2d: total += 2.0 * y.c * y.h * y.w * double(x.c) * n.kernel_h * n.kernel_w; break;
      case Op::Linear: total += 2.0 * double(x.c) * n.out_features; break;
      case Op::Attention: {
        const double tokens = double(x.h) * x.w, c = x.c, d = n.inner_dim ? n.inner_dim : x.c;
        total += 2.0 * tokens * c * 3 * d + 2.0 * tokens * d * c  // projections
                 + 2.0 * 2.0 * tokens * tokens * d;                // q k^T and p v over all heads
        break;
      }
      default: break;
    }
  }
  return total * batch;
}

}  // namespace ddim::graph
