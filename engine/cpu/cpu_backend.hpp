#pragma once
// The CPU reference backend: fp32 (or bf16 GEMM operands with fp32 accumulation), NCHW, the IR
// executed node by node over one liveness-planned arena, time-only nodes folded into per-timestep
// tables, each convolution fused with the bias, time-embedding and residual adds that follow it
// (graph::fuse_conv_adds) and its weights packed once for the session's GEMM kernel.
#include <array>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend.hpp"
#include "cpu/ops.hpp"
#include "graph/passes.hpp"
#include "model_impl.hpp"
#include "plan/host_plan.hpp"
#include "sampler/guidance.hpp"

namespace ddim::cpu {

class ThreadPool;

using plan::NodeWeights;

// Runs one node of g on the CPU for `batch` samples: in = the node's input buffers, y its output
// (layouts of engine/cpu/ops.hpp), with no fusion (a convolution reads in[0] only and adds its
// bias). scratch: attention_scratch_floats floats (attention only; may be null for other ops).
// Convolutions and attention pack their weights per call for `spec` (null: the process-wide fp32
// kernel of gemm_select_kernel).
void run_node(const graph::Graph& g, const graph::Node& n, const NodeWeights& weights, int batch,
              const std::vector<const float*>& in, float* y, float* scratch, ThreadPool* pool,
              const KernelSpec* spec = nullptr);

class CpuExecutor final : public Executor {
 public:
  CpuExecutor(const ExecutorContext& ctx, const SessionOptions& options);
  ~CpuExecutor() override;

  using Executor::forward;
  void forward(std::span<const float> x, std::span<const int> t, std::span<float> out, const Conditioning& cond) override;
  void forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                    const Session::NodeOutputCallback& dump, const Conditioning& cond) override;
  void sample(const SampleJob& job, SampleResult& result) override;
  const PlanInfo& plan_info() const override { return info_; }

  // Called with every node's output (batch-major, the node's shape per sample) in graph order.
  using NodeObserver = std::function<void(const graph::Node&, const graph::Value&, const float* data)>;
  // The forward pass without time-only folding: every node in graph order, each with its own
  // buffer (the reference for the folding test and the source of --dump).
  // With class labels: cond's labels (the conditional half only; no guidance).
  void forward_unfolded(std::span<const float> x, std::span<const int> t, std::span<float> out,
                        const NodeObserver& observer = {}, const Conditioning& cond = {});

  // "; it first appears in the output of node 'conv_in' (conv2d)": the first node whose output
  // holds NaN or Inf for this input (unfolded forward, one buffer per node), or "" if none does.
  std::string locate_nonfinite(std::span<const float> x, std::span<const int> t, const Conditioning& cond = {});

  // Benchmarks (tests/bench/bench_cpu_profile): called after every per-step node of a forward or
  // a sampling step with the node and its wall time. Empty: nothing is timed.
  using NodeTimer = std::function<void(const graph::Node&, double seconds)>;
  void set_node_timer(NodeTimer timer) { node_timer_ = std::move(timer); }

  int threads() const;  // the pool's threads, the caller included
  Isa isa() const { return isa_; }
  const graph::Graph& graph() const { return g_; }
  const graph::TimeFolding& folding() const { return fold_; }
  const graph::Graph& step_graph() const { return step_; }  // what run_step runs (and the node timer sees)
  const graph::MemoryPlan& memory_plan() const { return mem_; }  // of step_graph()

 private:
  // Rows per (entry of timesteps, condition): row s * conditions.count + u.
  void build_tables(std::span<const int> timesteps, const ConditionRows& conditions);
  void run_step(const float* x, std::span<const int> rows, float* out);  // run_batch_ samples
  // One forward of the batch: sample b at table timestep trow[b] with its condition; the guided
  // output when cond.guided() (a forward of 2N: the conditional half, then the null half).
  void forward_rows(const float* x, std::span<const int> trow, const ConditionRows& rows, const Conditioning& cond, float* out);
  std::size_t sample_elems() const;
  std::size_t out_elems() const;

  void run(const graph::Node& n, int batch, const std::vector<const float*>& in, float* out) {
    run_node(g_, n, node_weights_[std::size_t(&n - g_.nodes.data())], batch, in, out, scratch_.data(), pool_.get(),
             spec_);
  }
  void run_step_node(int i, const std::vector<const float*>& in, float* out);

  // A step node's weights packed for spec_ (convolutions and attention; empty otherwise).
  struct Packed {
    PackedA conv;
    PackedAttention attention;
  };

  std::shared_ptr<const Model> model_;
  std::vector<NodeWeights> node_weights_;  // per node of g_; null where absent
  const Model::Impl& m_;
  graph::Graph g_;                         // the model's graph: forward_unfolded and the time tables
  graph::TimeFolding fold_;
  graph::Graph step_;                      // g_ with conv + add fused: the per-step program
  graph::TimeFolding step_fold_;
  std::vector<int> step_node_of_;          // per node of step_: its node in g_
  std::vector<graph::ConvFusion> fusion_;  // per node of step_
  std::vector<Packed> packed_;             // per node of step_
  graph::MemoryPlan mem_;                  // of step_
  Isa isa_ = Isa::Portable;
  const KernelSpec* spec_ = nullptr;       // the GEMM kernel of every convolution and attention
  int batch_ = 1;
  int plan_batch_ = 1;  // the memory plan's batch: 2N for a class-conditional model (guidance)
  int run_batch_ = 1;   // the batch of the forward in progress (N, or 2N when guided)
  std::vector<float> x2_, out2_;  // the doubled input and output of a guided forward
  std::vector<float> arena_;
  std::vector<float> scratch_;
  std::unique_ptr<ThreadPool> pool_;
  std::vector<std::vector<float>> tables_;  // per value: rows x C (table values only)
  std::vector<int> table_timesteps_;
  std::vector<float> table_conditions_;
  PlanInfo info_;
  NodeTimer node_timer_;
};

}  // namespace ddim::cpu
