#pragma once
// The CUDA executor: the IR on one device, NHWC activations of one element type in a
// liveness-planned arena, convolutions through cuDNN (fused epilogues) or the direct kernel,
// projections through cuBLAS, the rest hand-written kernels; the time-only nodes folded into
// per-step tables on the host (fp32, once per schedule) and uploaded; one sampling step (table
// gather, forward, update, step counter) captured once as a CUDA graph and replayed per step.
//
// Thread safety: one executor (one Session) must not be used by two threads at once. Sessions
// are independent: each has its own stream, cuBLAS and cuDNN handles and arena, and sessions of
// one model on one device share its uploaded weights (read-only), so they run concurrently.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend.hpp"
#include "plan/host_plan.hpp"
#include "sampler/guidance.hpp"
#include "cuda/device_memory.hpp"
#include "cuda/kernels.hpp"
#include "graph/passes.hpp"
#include "model_impl.hpp"

namespace ddim::cuda {

class ConvPlanCache;
class CudnnConv;

class CudaExecutor final : public Executor {
 public:
  CudaExecutor(const ExecutorContext& ctx, const SessionOptions& options);
  ~CudaExecutor() override;

  using Executor::forward;
  void forward(std::span<const float> x, std::span<const int> t, std::span<float> out, const Conditioning& cond) override;
  void forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                    const Session::NodeOutputCallback& dump, const Conditioning& cond) override;
  void sample(const SampleJob& job, SampleResult& result) override;
  const PlanInfo& plan_info() const override { return info_; }
  void set_stream(void* cuda_stream) override;
  void* stream() const override { return stream_; }

 private:
  // One launch (or a few) of the step program, with the graph node it implements.
  struct StepOp {
    std::string name;
    std::function<void(cudaStream_t)> run;
  };
  void init(const ExecutorContext& ctx);
  void open_cudnn();
  void release() noexcept;
  void forward_impl(std::span<const float> x, std::span<const int> t, std::span<float> out,
                    const Session::NodeOutputCallback* dump, const Conditioning& cond);
  void plan();
  void build_program();
  std::vector<StepOp> build_ops(int n, bool report, std::size_t& workspace, std::size_t& attention_scratch);
  // The step program (eager), NVTX range per op in profile mode; doubled: the 2N program (guidance).
  void run_forward_ops(cudaStream_t stream, bool doubled = false);
  // The folded tables for these timesteps and conditions (row s * conditions.count + u).
  void upload_tables(std::span<const int> timesteps, const ConditionRows& conditions);
  bool guidance_capable() const { return g_.class_labels >= 0; }
  // Throws InvalidArgument unless p is device memory of this executor's device.
  void check_device_pointer(const void* p, const char* what) const;
  void upload_converted(const std::vector<std::pair<std::span<const float>, void*>>& pieces);
  void* value_ptr(int v) const;
  template <class F> auto guarded(const char* what, F&& f) -> decltype(f());

  std::shared_ptr<const Model> model_;
  const Model::Impl& m_;
  SessionOptions options_;
  DType dtype_ = DType::F16;
  int device_ = 0;
  graph::Graph g_;                 // the fused step graph (conv + add epilogues merged)
  graph::TimeFolding fold_;
  graph::MemoryPlan mem_;
  std::vector<plan::NodeWeights> host_weights_;  // for the host time tables
  std::shared_ptr<const DeviceWeights> weights_;
  std::vector<int> node_of_;       // fused graph node -> model graph node (for the weights)

  cudaStream_t own_stream_ = nullptr;  // created with the session
  cudaStream_t stream_ = nullptr;      // where work goes: own_stream_ or the caller's (set_stream)
  cublasHandle_t cublas_ = nullptr;
  cudnnHandle_t cudnn_ = nullptr;
  std::shared_ptr<ConvPlanCache> convs_;  // null when cuDNN is not used (cudnn_off_ says why)
  std::vector<std::shared_ptr<const CudnnConv>> conv_plans_;  // the plans the program runs
  std::string cudnn_off_;
  DeviceBuffer arena_, workspace_, cublas_workspace_, attention_scratch_;
  DeviceBuffer staging_;           // fp32 host-layout input / output
  DeviceBuffer output_;            // SampleJob::output_on_device results
  DeviceBuffer fetch_;             // trajectory / x0 on their way to the host
  DeviceBuffer x_, x0_all_, trajectory_;
  DeviceBuffer params_, seeds_, noise_, step_index_;
  std::vector<DeviceBuffer> tables_;  // per value: (rows, C) of the element type
  std::vector<int> table_timesteps_;
  std::vector<StepOp> program_;
  std::vector<StepOp> program2_;      // class-conditional models: the program for 2N samples
  int plan_batch_ = 0;                // the memory plan's batch: N, or 2N for a class-conditional model
  std::vector<float> table_conditions_;  // the conditions table_timesteps_'s tables were made for
  DeviceBuffer rows_;                 // class-conditional models: (S, 2N) table rows per step and sample
  std::vector<int> rows_uploaded_;    // what rows_ holds
  std::pair<double, double> captured_guidance_{1, 0};  // (scale, rescale) in the captured graph

  std::vector<graph::ConvFusion> fusion_;  // per node of g_: the adds merged into a convolution
  int ctx_height_ = 0, ctx_width_ = 0;

  // The captured step and what it was captured with; invalid when a buffer it uses moved.
  cudaGraphExec_t step_graph_ = nullptr;
  bool step_graph_valid_ = false;
  std::vector<const void*> captured_with_;
  std::pair<double, double> captured_threshold_{0, 0};  // (ratio, max value) in the captured graph
  DeviceBuffer threshold_buffer_;  // unclipped x0, per-sample bounds, selection scratch
  std::size_t captured_repeats_ = 0;  // steps in the captured graph (1, or S for the whole loop)
  std::string graph_failure_;  // why capturing the step failed twice; the steps then run eagerly

  std::string lost_;  // non-empty after a sticky device error: every later call reports it
  PlanInfo info_;
};

}  // namespace ddim::cuda
