#pragma once
// ddim::Session: a model planned on one backend for one batch size, precision and sample size.
//
// Thread safety: a Model is immutable and may be shared freely. A Session is NOT thread-safe:
// use one session per thread (sessions are cheap to make relative to a model load); const
// queries (plan_info, model, backend, timestep_plan) may run concurrently with each other but
// not with another call. Free functions and ddim::Scheduler are thread-safe (const methods).
// tests/tsan/test_concurrency.cpp checks these statements under ThreadSanitizer.
//
// Compatibility: the C++ API promises source compatibility within a major version only (struct
// layouts and the C++ ABI may change); the stable ABI is the C API, ddim/ddim.h.
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

DDIM_API const char* to_string(BackendKind) noexcept;
DDIM_API const char* to_string(Precision) noexcept;
DDIM_API BackendKind parse_backend(const std::string&);  // "auto", "cpu", "cuda"
DDIM_API Precision parse_precision(const std::string&);  // "auto", "fp32", "fp16", "bf16"

// Number of usable CUDA devices; 0 when built without CUDA or when the driver or device is
// missing (e.g. "CUDA driver version is insufficient"). Never throws.
DDIM_API int cuda_device_count() noexcept;

// The largest batch a session takes, on every backend (a CUDA grid dimension holds 65535 blocks).
inline constexpr int kMaxBatch = 65535;
// The largest sample height and width a session takes (SessionOptions::height, width).
inline constexpr int kMaxSampleSize = 16384;
// The most CPU worker threads a session takes (SessionOptions::threads).
inline constexpr int kMaxThreads = 1024;

struct SessionOptions {
  BackendKind backend = BackendKind::Auto;
  int device = 0;  // CUDA device ordinal
  int batch = 1;  // 1 .. kMaxBatch
  Precision precision = Precision::Auto;
  int height = 0;   // 0: the model's declared size
  int width = 0;
  // Latent models (ModelInfo::is_latent): height and width are the decoded image's pixels
  // (multiples of the decoder's factor f; the U-Net samples latents of height/f x width/f), and
  // sample() decodes the final latents once at the end. decode = false: no decoder is planned and
  // sample() returns the latents. Ignored for pixel-space models.
  bool decode = true;
  int threads = 0;  // CPU worker threads, 0 .. kMaxThreads; 0: hardware concurrency
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
// throws ddim::Error with ErrorCode::Cancelled). (The C API's callback cancels by returning
// non-zero.) It runs on the thread that made the call, between steps, so it may read a flag that
// another thread sets (an std::atomic) to cancel from there; tests/tsan checks this.
using ProgressCallback = std::function<bool(int done, int total)>;

// Class conditioning and classifier-free guidance, for models exported with class labels
// (ModelInfo::class_kind; weights/FORMAT.md section 8). A conditional model needs labels (as in
// diffusers); an unconditional model refuses every field here except the defaults.
//   index models  (nn.Embedding): class_labels are integers in [0, num_classes);
//   scalar models (class_embed_type "timestep"): class_labels are real numbers;
//   vector models (class_embed_type "identity"): class_embeddings, D = the time-embedding width.
// One label (or one D-vector) applies to every sample; else one per sample (N).
// Guidance: model output = u + w (c - u) with c the output for the sample's label and u the
// output for the null label, both from one forward of 2N samples; w = 1 runs only the conditional
// half (N). guidance_rescale (phi in [0, 1]) then applies diffusers' rescale_noise_cfg to the
// guided output, whatever the prediction type. The null label comes from here, else from the
// model file (recorded by the exporter when told); with neither, guidance is an error.
// Both backends: the CUDA backend gathers each sample's folded rows on the device and combines the
// halves in a kernel (kernels/guidance.cu) with the same per-element math (kernels/cfg.h).
struct ClassConditioning {
  std::vector<double> class_labels;            // index / scalar models: N values, or 1 for all
  std::vector<float> class_embeddings;         // vector models: (N, D), or (D) for all
  double guidance_scale = 1.0;                 // w, finite, in [0, 1000]
  double guidance_rescale = 0.0;               // phi in [0, 1]; 0: off
  std::optional<double> null_class_label;      // index / scalar models; default: the file's
  std::vector<float> null_class_embedding;     // vector models: (D); default: the file's
};

// The element type of images a CUDA session writes into a caller's device buffer.
enum class OutputType { Float32, SessionPrecision };

struct SampleOptions {
  int steps = 50;
  std::optional<Spacing> spacing;        // default: the model's timestep_spacing
  std::vector<int> timesteps;            // a custom list (overrides steps and spacing)
  double eta = 0.0;
  std::uint64_t seed = 0;                // sample i of the batch uses seed + i ...
  std::vector<std::uint64_t> seeds;      // ... unless given here, one per sample (N). A sample's
                                         // x_T and per-step noise depend on its own seed only, so
                                         // unrelated requests can share a batch.
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
  // CUDA sessions, the caller's device memory (on the session's device; a host pointer or
  // another device's is InvalidArgument; a CPU session refuses them):
  //   x_T_device    (N, C, H, W) fp32 start, instead of x_T;
  //   noise_device  (S, N, C, H, W) fp32 per-step noise, instead of noise (eta > 0);
  //   output_device the final images (N, C, H, W), written there instead of SampleResult::images,
  //                 as fp32 or in the session's precision (output_type). The session reads and
  //                 writes them in order on its stream (set_stream).
  const float* x_T_device = nullptr;
  const float* noise_device = nullptr;
  void* output_device = nullptr;
  OutputType output_type = OutputType::Float32;
  ClassConditioning conditioning;        // class labels and guidance (class-conditional models)
};

struct SampleResult {
  int n = 0, c = 0, h = 0, w = 0;
  std::vector<int> timesteps;     // the timesteps actually visited
  std::string warning;            // e.g. the spacing gave a different step count than asked
  std::vector<float> images;      // (N, C, H, W), the raw final sample (not clamped); latent
                                  // models: the decoded images (the latents with decode off)
  int latent_c = 0, latent_h = 0, latent_w = 0;  // the sampled space (latents; = c, h, w for
                                                 // pixel models): trajectory and x0 slices
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
  std::vector<std::string> folded_per_label;  // those of folded_nodes evaluated per (step, class
                                              // label) (class-conditional models): their tables
                                              // hold one row per step and distinct label of a call
  int forward_batch = 0;                  // samples the memory plan holds: the batch, or 2x the
                                          // batch for a class-conditional model (guidance)
  std::vector<std::string> fusions;       // e.g. "up_blocks.0.resnets.0.norm1 + silu"
  std::size_t arena_bytes = 0;            // activation arena (liveness-planned)
  std::size_t unplanned_bytes = 0;        // sum of all activation buffers without the plan
  std::size_t weight_bytes = 0;
  double forward_flops = 0;               // one forward of the batch (graph/passes.hpp: forward_flops)
  std::vector<std::string> warnings;      // e.g. the CUDA graph capture failed and the steps run
                                          // eagerly (known after the first sample)
  std::string fallback;                   // BackendKind::Auto on the CPU although a CUDA device
                                          // exists: why the CUDA backend could not be used
  std::string decoder;                    // latent models: the decoder's plan in one line ("" when
                                          // none is planned); its arena is not in arena_bytes
};

class DDIM_API Session {
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
  // One forward pass of a class-conditional model with its labels; with guidance_scale != 1 the
  // guided output (both halves in one forward of 2N). `dump`, when set, sees the conditional half.
  std::vector<float> forward(std::span<const float> x, std::span<const int> t, const ClassConditioning& conditioning,
                             const NodeOutputCallback& dump = {});

  // Latent models, with SessionOptions::decode: the decoder alone on latents (N, C, h, w) of the
  // session's batch and latent size: z = latents / scaling_factor + shift_factor (as diffusers
  // divides before vae.decode), then the decoder graph; returns images (N, C_img, f*h, f*w).
  // dump: every decoder node's output in graph order (node names carry the component prefix).
  std::vector<float> decode(std::span<const float> latents, const NodeOutputCallback& dump = {});

  // The timesteps sample(options) visits (the count can differ from options.steps, e.g. uniform
  // spacing), without sampling: the size of what it returns, e.g. trajectory (S + 1, N, C, H, W)
  // and x0 (S, N, C, H, W), and of noise it needs. Throws like sample() on bad options.
  TimestepPlan timestep_plan(const SampleOptions& options) const;

  // ---- CUDA sessions in the caller's GPU pipeline (a CPU session throws InvalidArgument)
  // Every later call enqueues its work, graph launches included, on `cuda_stream` (a
  // cudaStream_t of the session's device; nullptr: the session's own stream). The session makes
  // the new stream wait for what it enqueued on the old one (an event, no host synchronisation),
  // so its own buffers stay ordered; the caller orders its buffers (inputs, outputs) on the new
  // stream itself. The stream must stay valid while the session uses it: until the session is
  // destroyed or given another stream (set_stream(nullptr) returns to its own).
  void set_stream(void* cuda_stream);
  void* stream() const;
  // The whole sample enqueued on the session's stream, returning at once: no host
  // synchronisation, no progress callback. The images are in options.output_device when the
  // stream reaches that point. Needs output_device; x_T / noise from the seeds or from device
  // pointers (x_T_device, noise_device); no trajectory, x0, progress or output_on_device. The
  // first call of a new shape may allocate (and so synchronise). Returns the timesteps enqueued.
  // It may be captured into the caller's own CUDA graph (cudaStreamBeginCapture on the session's
  // stream, then sample_async, then cudaStreamEndCapture): the launches go into that graph, with
  // the seeds and step parameters of the call baked in. A call with the same options outside the
  // capture must come first (it allocates and uploads); otherwise InvalidArgument, before
  // anything is enqueued. sample() refuses a capturing stream (it waits for its results).
  TimestepPlan sample_async(const SampleOptions& options);

  const PlanInfo& plan_info() const noexcept;
  const Model& model() const noexcept;
  BackendKind backend() const noexcept;

  struct Impl;

 private:
  explicit Session(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ddim
