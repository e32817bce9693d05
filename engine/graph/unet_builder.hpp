#pragma once
// Builds the ddim graph of a diffusers UNet2DModel of the DDPM family (DownBlock2D /
// AttnDownBlock2D / UNetMidBlock2D / UpBlock2D / AttnUpBlock2D, positional time embedding), with
// diffusers' state-dict names, plus random weights: for tests, benchmarks and the generated demo
// model. tools/export.py emits the same graph from a real model.
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ddim/schedule.hpp"
#include "format/container.hpp"
#include "graph/ir.hpp"

namespace ddim::graph {

struct UNetConfig {
  int sample_height = 32, sample_width = 32;
  int in_channels = 3, out_channels = 3;
  std::vector<int> block_out_channels{128, 256, 256, 256};
  std::vector<bool> down_attention{false, true, false, false};  // AttnDownBlock2D per level
  std::vector<bool> up_attention;                                // default: down_attention reversed
  int layers_per_block = 2;
  std::optional<int> attention_head_dim;  // nullopt: one head as wide as the channels
  int norm_num_groups = 32;
  double norm_eps = 1e-5;
  int downsample_padding = 1;
  bool flip_sin_to_cos = true;
  double freq_shift = 0.0;
  bool center_input_sample = false;
  double mid_block_scale_factor = 1.0;
  bool add_attention = true;
  // Class conditioning (diffusers' class_embed_type / num_class_embeds), added to the time
  // embedding: Index = nn.Embedding(num_classes, 4 ch0) (class_embed_type None with
  // num_class_embeds), Scalar = "timestep" (the labels through the time projection and a
  // TimestepEmbedding MLP), Vector = "identity" (the caller's 4 ch0 values). class_null: the
  // unconditional input recorded in the file (1 value, or 4 ch0 values; empty: none).
  ClassKind class_kind = ClassKind::None;
  int num_classes = 0;
  std::vector<float> class_null;

  // The google/ddpm-cifar10-32 architecture (35,746,307 parameters).
  static UNetConfig cifar10();
  // The google/ddpm-celebahq-256 architecture (113,673,219 parameters).
  static UNetConfig celebahq256();
};

struct BuiltUNet {
  nlohmann::json graph;
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> params;  // state-dict names, shapes
  std::int64_t parameter_count() const;
};
BuiltUNet build_unet2d(const UNetConfig& config);

// A complete model file: the graph, the schedule and random weights drawn deterministically from
// `seed` at PyTorch's default initialisation scale (uniform +-1/sqrt(fan_in)); norm affines are
// drawn near (1, 0) so that a bug in them shows.
std::vector<std::uint8_t> make_random_model_file(const UNetConfig& config, const ScheduleConfig& schedule,
                                                 std::uint64_t seed, format::DType dtype = format::DType::F32);

}  // namespace ddim::graph
