#pragma once
// The CPU reference backend: fp32, NCHW, the IR executed node by node over one liveness-planned
// arena, time-only nodes folded into per-timestep tables.
#include <array>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend.hpp"
#include "graph/passes.hpp"
#include "model_impl.hpp"
#include "plan/host_plan.hpp"

namespace ddim::cpu {

class ThreadPool;

using plan::NodeWeights;

// Runs one node of g on the CPU for `batch` samples: in = the node's input buffers, y its output
// (layouts of engine/cpu/ops.hpp). scratch: conv2d_scratch_floats / attention_scratch_floats
// floats (convolution and attention only; may be null for other ops).
void run_node(const graph::Graph& g, const graph::Node& n, const NodeWeights& weights, int batch,
              const std::vector<const float*>& in, float* y, float* scratch, ThreadPool* pool);

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(const ExecutorContext& ctx, const SessionOptions& options);
  ~CpuExecutor() override;

  void forward(std::span<const float> x, std::span<const int> t, std::span<float> out) override;
  void forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                    const Session::NodeOutputCallback& dump) override;
  void sample(const SampleJob& job, SampleResult& result) override;
  const PlanInfo& plan_info() const override { return info_; }

  // Called with every node's output (batch-major, the node's shape per sample) in graph order.
  using NodeObserver = std::function<void(const graph::Node&, const graph::Value&, const float* data)>;
  // The forward pass without time-only folding: every node in graph order, each with its own
  // buffer (the reference for the folding test and the source of --dump).
  void forward_unfolded(std::span<const float> x, std::span<const int> t, std::span<float> out,
                        const NodeObserver& observer = {});

  // "; it first appears in the output of node 'conv_in' (conv2d)": the first node whose output
  // holds NaN or Inf for this input (unfolded forward, one buffer per node), or "" if none does.
  std::string locate_nonfinite(std::span<const float> x, std::span<const int> t);

  const graph::Graph& graph() const { return g_; }
  const graph::TimeFolding& folding() const { return fold_; }
  const graph::MemoryPlan& memory_plan() const { return mem_; }

 private:
  void build_tables(std::span<const int> timesteps);  // one row per entry
  void run_step(const float* x, std::span<const int> rows, float* out);
  std::size_t sample_elems() const;
  std::size_t out_elems() const;

  void run(const graph::Node& n, int batch, const std::vector<const float*>& in, float* out) {
    run_node(g_, n, node_weights_[std::size_t(&n - g_.nodes.data())], batch, in, out, scratch_.data(), pool_.get());
  }

  std::shared_ptr<const Model> model_;
  std::vector<NodeWeights> node_weights_;  // per node; null where absent
  const Model::Impl& m_;
  graph::Graph g_;
  graph::TimeFolding fold_;
  graph::MemoryPlan mem_;
  int batch_ = 1;
  std::vector<float> arena_;
  std::vector<float> scratch_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<std::vector<float>> tables_;  // per value: rows x C (table values only)
  std::vector<int> table_timesteps_;
  PlanInfo info_;
};

}  // namespace ddim::cpu
