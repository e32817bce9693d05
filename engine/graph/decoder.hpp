#pragma once
// Latent models (format version 2, weights/FORMAT.md section 9): a decoder graph beside the
// U-Net (`ddim.decoder`) and the latent configuration (`ddim.latent`), and a builder of the
// decoders of diffusers' VQModel and AutoencoderKL (for ddim-make-model's presets and the tests;
// tools/export.py emits the same graphs from real models).
//
// The decoder graph uses the IR of ddim.graph with one input, `sample` (the latents as the U-Net
// samples them: its channels and declared size), no timestep, and an output `factor` times the
// sample's height and width. Its first node reads the latents already divided by the scaling
// factor (the session does that on the host, exactly as diffusers does before decode()).
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ddim/schedule.hpp"
#include "format/container.hpp"
#include "graph/ir.hpp"
#include "graph/unet_builder.hpp"

namespace ddim::graph {

// `ddim.latent`: how latents become the decoder's input, z = latents / scaling_factor + shift_factor.
struct LatentConfig {
  std::string decoder;          // "vq" (VQModel) or "kl" (AutoencoderKL)
  std::string component;        // the pipeline component and tensor-name prefix: "vqvae", "vae"
  double scaling_factor = 1.0;  // > 0
  double shift_factor = 0.0;
  int factor = 1;               // image size / latent size (2^(len(block_out_channels) - 1))
};
// Throws ddim::Error(InvalidFile) naming the key.
LatentConfig parse_latent_config(const nlohmann::json& j);
nlohmann::json latent_config_to_json(const LatentConfig& c);

// Parses `ddim.decoder`: the ddim.graph schema with inputs {"sample": {channels, height, width}}
// only. The returned graph carries an unused `timestep` value (so that the executors, which run
// graphs with both inputs, run it unchanged) and output_scale = factor. Throws InvalidFile.
Graph parse_decoder_graph(const nlohmann::json& j, int factor);

// The decoder of a diffusers VQModel (decoder "vq": quantize, post_quant_conv, decoder) or
// AutoencoderKL (decoder "kl": post_quant_conv unless disabled, decoder), nodes and tensors
// named `<component>.<diffusers module path>`.
struct DecoderConfig {
  std::string decoder = "vq";
  std::string component = "vqvae";
  int latent_channels = 3;      // the U-Net's channels (VQModel: vq_embed_dim)
  int decoder_in_channels = 3;  // VQModel's latent_channels (post_quant_conv's output)
  int out_channels = 3;
  int num_vq_embeddings = 8192;
  std::vector<int> block_out_channels{128, 256, 512};
  int layers_per_block = 2;
  int norm_num_groups = 32;
  bool mid_block_add_attention = true;
  bool use_post_quant_conv = true;
  double scaling_factor = 0.18215, shift_factor = 0.0;
  int latent_height = 64, latent_width = 64;

  int factor() const { return 1 << (block_out_channels.size() - 1); }
  // The vqvae of CompVis/ldm-celebahq-256: 3 latent channels, 8192 entries, (128, 256, 512).
  static DecoderConfig ldm_celebahq256();
};
struct BuiltDecoder {
  nlohmann::json graph;
  LatentConfig latent;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> params;  // names, shapes
  std::int64_t parameter_count() const;
};
BuiltDecoder build_decoder(const DecoderConfig& config);

// The __metadata__ of a latent model file (format version 2).
std::map<std::string, std::string> make_latent_metadata(const nlohmann::json& unet_graph, const ScheduleConfig& schedule,
                                                        const BuiltDecoder& decoder);

// Random tensors for `params` as make_random_model_file draws them (PyTorch's init scale; norm
// affines near (1, 0)), appended to `out`; codebooks uniform in [-1, 1).
void append_random_tensors(const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& params,
                           std::uint64_t& state, format::DType dtype, std::vector<format::TensorData>& out);

// The U-Net of CompVis/ldm-celebahq-256 (64x64x3 latents, channels (224, 448, 672, 896),
// attention at 32, 16 and 8 with 32-wide heads) and its schedule (scaled_linear betas 0.0015 ..
// 0.0195 over 1000 steps, epsilon, no clipping).
UNetConfig ldm_celebahq256_unet();
ScheduleConfig ldm_celebahq256_schedule();

// A complete latent model file with random weights (the U-Net's and the decoder's, drawn as
// make_random_model_file draws them, from one seed).
std::vector<std::uint8_t> make_random_latent_model_file(const UNetConfig& unet, const DecoderConfig& decoder,
                                                        const ScheduleConfig& schedule, std::uint64_t seed,
                                                        format::DType dtype = format::DType::F32);

}  // namespace ddim::graph
