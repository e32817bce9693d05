#pragma once
// ddim::Model: a validated model file in host memory (fp32 weights, the network, the schedule).
// Immutable after load; one Model may be shared by any number of sessions and threads.
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ddim/export.hpp"
#include "ddim/schedule.hpp"

namespace ddim {

struct ModelInfo {
  int format_version = 0;
  int in_channels = 0;   // of the `sample` input
  int out_channels = 0;  // of the output
  int height = 0;        // the sample size the model declares (sessions may choose another
  int width = 0;         // size the architecture admits)
  std::int64_t parameter_count = 0;
  std::int64_t node_count = 0;
  std::map<std::string, std::int64_t> tensors_by_dtype;  // "F32" -> count, as stored in the file
  // Class conditioning (format version 2): "" for an unconditional model, else "index" (integer
  // labels in [0, num_classes)), "scalar" or "vector" (class_dim values per sample); the null
  // (unconditional) input the file records for classifier-free guidance, if any.
  std::string class_kind;
  int num_classes = 0;
  int class_dim = 0;
  std::vector<float> null_class;  // 1 value (index, scalar) or class_dim values; empty: none recorded
  // Latent models (format version 2; weights/FORMAT.md section 9): the U-Net samples latents of
  // (in_channels, height, width) and the decoder turns them into images factor times larger.
  // parameter_count and node_count above are the U-Net's.
  struct Latent {
    std::string decoder;    // "vq" (VQModel) or "kl" (AutoencoderKL); empty: a pixel-space model
    std::string component;  // "vqvae", "vae": the decoder's tensor and node name prefix
    double scaling_factor = 1.0, shift_factor = 0.0;  // decoder input = latents / scaling + shift
    int factor = 1;                                    // image height / latent height
    int image_channels = 0;
    std::int64_t decoder_parameter_count = 0, decoder_node_count = 0;
  } latent;
  bool is_latent() const { return !latent.decoder.empty(); }
};

class DDIM_API Model {
 public:
  // Reads and validates a model file. Every problem is a ddim::Error (InvalidFile or Io) naming
  // the key or tensor at fault; nothing is allocated for tensor data before validation passes.
  static std::shared_ptr<const Model> load(const std::filesystem::path& path);
  // The same from bytes in memory (the whole file).
  static std::shared_ptr<const Model> load_from_memory(std::span<const std::uint8_t> bytes,
                                                       const std::string& name = "<memory>");

  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelInfo& info() const noexcept;
  const ScheduleConfig& schedule() const noexcept;
  // Human-readable architecture summary (ops, shapes, parameters) for `ddim info`.
  std::string summary() const;

  struct Impl;
  const Impl& impl() const noexcept { return *impl_; }

 private:
  explicit Model(std::unique_ptr<Impl> impl);
  static std::shared_ptr<const Model> from_impl(std::unique_ptr<Impl> impl);  // wraps a decoder too
  std::unique_ptr<Impl> impl_;
};

}  // namespace ddim
