#pragma once
// The internal backend interface. A Session owns one Executor, made for a model, a batch size, a
// precision and a sample size. Host interfaces carry no device types.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "ddim/session.hpp"
#include "kernels/ddim_step.h"
#include "kernels/ddpm_step.h"

namespace ddim {

struct ExecutorContext {
  std::shared_ptr<const Model> model;
  int height = 0, width = 0;
};

// The class conditioning of a call (graph input class_labels), checked and prepared by the
// session: each sample's condition, the unconditional ("null") condition, the guidance settings.
// Classifier-free guidance (guided()) runs one forward of 2N samples, the conditional half
// (samples 0..N-1) and the null half (N..2N-1) of the same x_t, and combines them per sample
// (kernels/cfg.h): out = u + w (c - u), then diffusers' rescale_noise_cfg when rescale > 0.
struct Conditioning {
  int width = 0;                  // values per condition: 0 unconditional, 1 index / scalar, D vector
  std::vector<float> labels;      // (N, width): each sample's condition
  std::vector<float> null_label;  // (width): the unconditional input (guidance only)
  double guidance_scale = 1.0;
  double guidance_rescale = 0.0;  // phi of rescale_noise_cfg; 0: off
  bool guided() const { return width > 0 && guidance_scale != 1.0; }
};

// Everything a backend needs to run a whole DDIM sampling loop, prepared on the host. DDIM
// inversion (Session::invert) runs through the same loop: x_T is the clean x0, the timesteps
// ascend, and the step parameters carry the inversion's alpha-bars (sigma = 0). DDPM ancestral
// sampling (Session::sample_ddpm) too: its steps select the DDPM update (DdimStepParams::update,
// kernels/ddpm_step.h), with sigma the posterior standard deviation (noise drawn when sigma > 0).
struct SampleJob {
  std::vector<int> timesteps;                 // S model-evaluation timesteps, in step order (may repeat)
  std::vector<DdimStepParams> steps;          // S per-step parameters (float, shared math)
  std::vector<std::uint64_t> seeds;           // N per-sample seeds
  std::span<const float> x_T;                 // empty: from the seeds
  std::span<const float> noise;               // empty: from the seeds (when sigma > 0)
  double dynamic_thresholding_ratio = 0.995;  // used by steps with clip == kClipThreshold
  double sample_max_value = 1.0;
  bool want_trajectory = false, want_x0 = false;
  bool output_on_device = false;              // CUDA: SampleResult::device_images instead of images
  ProgressCallback progress;
  // CUDA only (the session checks the backend and the pointers' sizes; the executor checks that
  // they are device memory of its device): the caller's device inputs and output.
  const float* x_T_device = nullptr;          // (N, C, H, W) fp32
  const float* noise_device = nullptr;        // (S, N, C, H, W) fp32
  void* output_device = nullptr;              // (N, C, H, W), fp32 or the session's precision
  bool output_session_precision = false;
  bool async = false;                         // enqueue only: no host synchronisation, no host results
  Conditioning cond;                          // class labels and guidance (empty: unconditional)
};

class Executor {
 public:
  virtual ~Executor() = default;
  // One forward pass: x (N, C, H, W) host, t one per sample; out (N, C_out, H, W) host; with
  // cond's labels and guidance (the guided output when cond.guided()).
  virtual void forward(std::span<const float> x, std::span<const int> t, std::span<float> out, const Conditioning& cond) = 0;
  void forward(std::span<const float> x, std::span<const int> t, std::span<float> out) { forward(x, t, out, Conditioning{}); }
  // The same, reporting every node's output (no folding, no fusion: one value per graph node; the
  // conditional half only).
  virtual void forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                            const Session::NodeOutputCallback& dump, const Conditioning& cond) = 0;
  // The whole sampling loop; fills images (and trajectory / x0 when asked).
  virtual void sample(const SampleJob& job, SampleResult& result) = 0;
  virtual const PlanInfo& plan_info() const = 0;
  // CUDA: the stream every later call enqueues on (nullptr: the executor's own); see
  // Session::set_stream. Other backends throw InvalidArgument.
  virtual void set_stream(void* cuda_stream);
  virtual void* stream() const;
};

}  // namespace ddim
