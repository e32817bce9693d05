#pragma once
// ddim::Session: a model planned on one backend for one batch size, precision and sample size.
//
// Thread safety: a Model is immutable and may be shared freely. A Session is NOT thread-safe:
// use one session per thread (sessions are cheap to make relative to a model load). Free
// functions and ddim::Scheduler are thread-safe (const methods).
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "ddim/model.hpp"
#include "ddim/schedule.hpp"

namespace ddim {

struct InvertOptions;  // ddim/toolkit.hpp
struct InvertResult;
struct DdpmOptions;   // ddim/toolkit.hpp

enum class BackendKind { Auto, Cpu, Cuda };
enum class Precision { Auto, FP32, FP16, BF16 };  // Auto: fp16 on CUDA, fp32 on the CPU

const char* to_string(BackendKind) noexcept;
const char* to_string(Precision) noexcept;
BackendKind parse_backend(const std::string&);  // "auto", "cpu", "cuda"
Precision parse_precision(const std::string&);  // "auto", "fp32", "fp16", "bf16"

// Number of usable CUDA devices; 0 when built without CUDA or when the driver or device is
// missing (e.g. "CUDA driver version is insufficient"). Never throws.
int cuda_device_count() noexcept;

// The largest batch a session takes, on every backend (a CUDA grid dimension holds 65535 blocks).
inline constexpr int kMaxBatch = 65535;

struct SessionOptions {
  BackendKind backend = BackendKind::Auto;
  int device = 0;  // CUDA device ordinal
  int batch = 1;  // 1 .. kMaxBatch
  Precision precision = Precision::Auto;
  int height = 0;   // 0: the model's declared size
  int width = 0;
  int threads = 0;  // CPU worker threads; 0: hardware concurrency
  // CUDA: run every step eagerly (no CUDA graph) with one NVTX range per graph node, for
  // profiling with Nsight Systems / Compute (ranges inside a captured graph do not replay).
  bool profile = false;
  // CUDA: time every usable cuDNN engine for each convolution at plan time and keep the fastest
  // (the choice is then fixed for the session); default: cuDNN's heuristics.
  bool autotune = false;
  // CUDA: capture all the steps of a sample call as one graph (one launch per call; per-step NVTX
  // ranges then become one range `ddim.loop`). Used when no progress callback is set; recaptured
  // when the step count changes. Default: one step captured once and replayed per step.
  bool whole_loop_graph = false;
};

// Called after every step with (steps done, steps total); return false to cancel (the call then
// throws ddim::Error with ErrorCode::Cancelled).
using ProgressCallback = std::function<bool(int done, int total)>;

struct SampleOptions {
  int steps = 50;
  std::optional<Spacing> spacing;        // default: the model's timestep_spacing
  std::vector<int> timesteps;            // a custom list (overrides steps and spacing)
  double eta = 0.0;
  std::uint64_t seed = 0;                // sample i of the batch uses seed + i
  std::span<const float> x_T;            // optional: (N, C, H, W) start; default from the seeds
  std::span<const float> noise;          // optional: (S, N, C, H, W) unit normal, per step taken
  std::optional<bool> clip_sample;       // defaults: the model's schedule
  std::optional<bool> set_alpha_to_one;
  std::optional<int> steps_offset;
  bool use_clipped_model_output = false;
  bool want_trajectory = false;          // x_t after each step, x_T first: (S+1, N, C, H, W)
  bool want_x0 = false;                  // the x0 prediction of each step: (S, N, C, H, W)
  ProgressCallback progress;
  // CUDA sessions: leave the final images on the device (SampleResult::device_images) instead of
  // copying them to the host, for callers who keep working on the GPU. Ignored on the CPU.
  bool output_on_device = false;
};

struct SampleResult {
  int n = 0, c = 0, h = 0, w = 0;
  std::vector<int> timesteps;     // the timesteps actually visited
  std::string warning;            // e.g. the spacing gave a different step count than asked
  std::vector<float> images;      // (N, C, H, W), the raw final sample (not clamped)
  std::vector<float> trajectory;  // when asked
  std::vector<float> x0;          // when asked
  // With SampleOptions::output_on_device on a CUDA session: the final images, (N, C, H, W) fp32
  // in device memory owned by the session, valid until its next call; `images` is then empty.
  // The data is complete when sample() returns (the session's stream has been synchronised).
  const float* device_images = nullptr;
};

struct PlanInfo {
  std::string backend;        // "cpu" or "cuda:0 (NVIDIA H100 ...)"
  std::string precision;
  int batch = 0, height = 0, width = 0;
  std::vector<std::string> folded_nodes;  // evaluated once per schedule into tables
  std::vector<std::string> fusions;       // e.g. "up_blocks.0.resnets.0.norm1 + silu"
  std::size_t arena_bytes = 0;            // activation arena (liveness-planned)
  std::size_t unplanned_bytes = 0;        // sum of all activation buffers without the plan
  std::size_t weight_bytes = 0;
  double forward_flops = 0;               // one forward of the batch (graph/passes.hpp: forward_flops)
  std::vector<std::string> warnings;      // e.g. the CUDA graph capture failed and the steps run
                                          // eagerly (known after the first sample)
  std::string fallback;                   // BackendKind::Auto on the CPU although a CUDA device
                                          // exists: why the CUDA backend could not be used
};

class Session {
 public:
  static std::unique_ptr<Session> create(std::shared_ptr<const Model> model, const SessionOptions& options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // DDIM sampling of a whole batch.
  SampleResult sample(const SampleOptions& options);
  // DDPM ancestral sampling over all T training timesteps (T-1 down to 0), for comparison with
  // DDIM: diffusers' DDPMScheduler.step (see ddim/toolkit.hpp). Runs the same loop as sample().
  SampleResult sample_ddpm(const DdpmOptions& options);
  // Deterministic DDIM inversion of x0 (N, C, H, W) to the x_T from which sample() with the same
  // steps and spacing at eta = 0 (clip_sample off) returns x0, up to the discretisation error
  // (see ddim/toolkit.hpp for the exact sequences).
  InvertResult invert(std::span<const float> x0, const InvertOptions& options);
  // One network forward pass: x (N, C, H, W), t one timestep for all or one per sample.
  // Returns the model output (N, C_out, H, W).
  std::vector<float> forward(std::span<const float> x, std::span<const int> t);
  // The same, calling `dump` with every graph node's output in graph order (for verification
  // against PyTorch: `ddim forward --dump`). Shapes are (N, C, H, W) or (N, C).
  using NodeOutputCallback = std::function<void(const std::string& node, const std::vector<std::int64_t>& shape,
                                                std::span<const float> values)>;
  std::vector<float> forward(std::span<const float> x, std::span<const int> t, const NodeOutputCallback& dump);

  const PlanInfo& plan_info() const noexcept;
  const Model& model() const noexcept;
  BackendKind backend() const noexcept;

  struct Impl;

 private:
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ddim
