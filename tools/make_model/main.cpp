// ddim-make-model: writes a model file with random weights for a built-in architecture. Used for
// the demo model the build generates (until the trained bundled model ships), for benchmarks
// and for tests. Not a substitute for tools/export.py, which converts trained PyTorch models.
#include <charconv>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "ddim/error.hpp"
#include "format/container.hpp"
#include "graph/decoder.hpp"
#include "graph/unet_builder.hpp"

namespace {

void usage(FILE* f) {
  std::fprintf(f,
               "usage: ddim-make-model --preset tiny|small|cifar10-32|celebahq-256|ldm-celebahq-256|ldm-tiny|ldm-tiny-kl\n"
               "                       --out FILE [--seed 0]\n"
               "                       [--dtype f32|f16|bf16] [--train-timesteps 1000]\n"
               "                       [--class index|scalar|vector] [--num-classes 10] [--record-null]\n"
               "  Writes a ddim model file with random weights (PyTorch's default init scale) and a linear\n"
               "  beta schedule (1e-4 .. 0.02) over --train-timesteps steps (fewer make DDPM runs short, for tests).\n"
               "  tiny:       32x32 RGB, channels (32, 64), attention at 16x16, 1 layer per block\n"
               "  small:      32x32 RGB, channels (64, 128, 128), attention at 16x16, 2 layers per block\n"
               "  cifar10-32: the google/ddpm-cifar10-32 architecture (35.7M parameters)\n"
               "  celebahq-256: the google/ddpm-celebahq-256 architecture (113.7M parameters)\n"
               "  ldm-celebahq-256: the CompVis/ldm-celebahq-256 latent model: U-Net on 64x64x3 latents and the\n"
               "               VQModel decoder (8192-entry codebook) to 256x256 RGB, its scaled_linear schedule\n"
               "               (0.0015 .. 0.0195); format version 2\n"
               "  ldm-tiny, ldm-tiny-kl: small latent models for tests: U-Net on 4x8x6 latents, a VQModel (kl:\n"
               "               AutoencoderKL, shift_factor 0.25) decoder of factor 2 to 16x12 RGB, scaling_factor 0.5\n"
               "  --class makes a class-conditional model (diffusers' num_class_embeds, class_embed_type \"timestep\" or\n"
               "  \"identity\"); --record-null records the unconditional input for guidance (index: the last class,\n"
               "  scalar: 0, vector: zeros).\n");
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset, out;
  std::uint64_t seed = 0;
  int train_timesteps = 1000;
  ddim::format::DType dtype = ddim::format::DType::F32;
  std::string class_kind = "none";
  int num_classes = 10;
  bool record_null = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "ddim-make-model: error: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      usage(stdout);
      return 0;
    } else if (a == "--preset") preset = value();
    else if (a == "--out") out = value();
    else if (a == "--seed") {
      std::string v = value();
      auto r = std::from_chars(v.data(), v.data() + v.size(), seed);
      if (r.ec != std::errc() || r.ptr != v.data() + v.size()) {
        std::fprintf(stderr, "ddim-make-model: error: --seed needs a non-negative integer, got '%s'\n", v.c_str());
        return 2;
      }
    } else if (a == "--train-timesteps") {
      std::string v = value();
      auto r = std::from_chars(v.data(), v.data() + v.size(), train_timesteps);
      if (r.ec != std::errc() || r.ptr != v.data() + v.size() || train_timesteps < 2 || train_timesteps > 100000) {
        std::fprintf(stderr, "ddim-make-model: error: --train-timesteps needs an integer in [2, 100000], got '%s'\n", v.c_str());
        return 2;
      }
    } else if (a == "--class") {
      class_kind = value();
      if (class_kind != "none" && class_kind != "index" && class_kind != "scalar" && class_kind != "vector") {
        std::fprintf(stderr, "ddim-make-model: error: --class must be none, index, scalar or vector\n");
        return 2;
      }
    } else if (a == "--num-classes") {
      std::string v = value();
      auto r = std::from_chars(v.data(), v.data() + v.size(), num_classes);
      if (r.ec != std::errc() || r.ptr != v.data() + v.size() || num_classes < 1 || num_classes > 1000000) {
        std::fprintf(stderr, "ddim-make-model: error: --num-classes needs an integer in [1, 1000000], got '%s'\n", v.c_str());
        return 2;
      }
    } else if (a == "--record-null") {
      record_null = true;
    } else if (a == "--dtype") {
      std::string v = value();
      if (v == "f32") dtype = ddim::format::DType::F32;
      else if (v == "f16") dtype = ddim::format::DType::F16;
      else if (v == "bf16") dtype = ddim::format::DType::BF16;
      else {
        std::fprintf(stderr, "ddim-make-model: error: --dtype must be f32, f16 or bf16\n");
        return 2;
      }
    } else {
      std::fprintf(stderr, "ddim-make-model: error: unknown option '%s'\n", a.c_str());
      usage(stderr);
      return 2;
    }
  }
  if (preset.empty() || out.empty()) {
    usage(stderr);
    return 2;
  }
  if (preset == "ldm-celebahq-256" || preset == "ldm-tiny" || preset == "ldm-tiny-kl") {
    try {
      const bool tiny = preset != "ldm-celebahq-256";
      ddim::graph::UNetConfig u = tiny ? ddim::graph::UNetConfig{} : ddim::graph::ldm_celebahq256_unet();
      ddim::graph::DecoderConfig d = tiny ? ddim::graph::DecoderConfig{} : ddim::graph::DecoderConfig::ldm_celebahq256();
      ddim::ScheduleConfig schedule = tiny ? ddim::ScheduleConfig{} : ddim::graph::ldm_celebahq256_schedule();
      if (tiny) {  // 4-channel 8x6 latents, a decoder of factor 2: 16x12 RGB images (for tests)
        u.sample_height = d.latent_height = 8;
        u.sample_width = d.latent_width = 6;
        u.in_channels = u.out_channels = d.latent_channels = 4;
        u.block_out_channels = {16, 32};
        u.down_attention = {false, true};
        u.layers_per_block = 1;
        u.attention_head_dim = 8;
        u.norm_num_groups = 8;
        const bool vq = preset == "ldm-tiny";
        d.decoder = vq ? "vq" : "kl";
        d.component = vq ? "vqvae" : "vae";
        d.decoder_in_channels = vq ? 3 : 4;
        d.num_vq_embeddings = 32;
        d.block_out_channels = {8, 16};
        d.layers_per_block = 1;
        d.norm_num_groups = 4;
        d.scaling_factor = 0.5;
        if (!vq) d.shift_factor = 0.25;
      }
      schedule.num_train_timesteps = train_timesteps;
      ddim::format::write_file(out, ddim::graph::make_random_latent_model_file(u, d, schedule, seed, dtype));
      std::printf("wrote %s (%s, U-Net %lld + %s decoder %lld parameters, random weights, seed %llu)\n", out.c_str(),
                  preset.c_str(), static_cast<long long>(ddim::graph::build_unet2d(u).parameter_count()),
                  d.decoder == "vq" ? "VQ" : "KL", static_cast<long long>(ddim::graph::build_decoder(d).parameter_count()), static_cast<unsigned long long>(seed));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ddim-make-model: error: %s\n", e.what());
      return 1;
    }
    return 0;
  }
  ddim::graph::UNetConfig c;
  if (preset == "tiny") {
    c.block_out_channels = {32, 64};
    c.down_attention = {false, true};
    c.layers_per_block = 1;
    c.norm_num_groups = 8;
  } else if (preset == "small") {
    c.block_out_channels = {64, 128, 128};
    c.down_attention = {false, true, false};
    c.norm_num_groups = 16;
  } else if (preset == "cifar10-32") {
    c = ddim::graph::UNetConfig::cifar10();
  } else if (preset == "celebahq-256") {
    c = ddim::graph::UNetConfig::celebahq256();
  } else {
    std::fprintf(stderr, "ddim-make-model: error: unknown preset '%s' (tiny, small, cifar10-32, celebahq-256, ldm-celebahq-256, ldm-tiny, ldm-tiny-kl)\n", preset.c_str());
    return 2;
  }
  using ddim::graph::ClassKind;
  c.class_kind = class_kind == "index" ? ClassKind::Index : class_kind == "scalar" ? ClassKind::Scalar
                 : class_kind == "vector" ? ClassKind::Vector : ClassKind::None;
  c.num_classes = num_classes;
  if (record_null && c.class_kind != ClassKind::None)
    c.class_null.assign(c.class_kind == ClassKind::Vector ? std::size_t(4 * c.block_out_channels[0]) : 1,
                        c.class_kind == ClassKind::Index ? float(num_classes - 1) : 0.0f);
  try {
    ddim::ScheduleConfig schedule;  // linear betas 1e-4..0.02, epsilon
    schedule.num_train_timesteps = train_timesteps;
    ddim::format::write_file(out, ddim::graph::make_random_model_file(c, schedule, seed, dtype));
    std::printf("wrote %s (%s, %lld parameters, random weights, seed %llu)\n", out.c_str(), preset.c_str(),
                static_cast<long long>(ddim::graph::build_unet2d(c).parameter_count()), static_cast<unsigned long long>(seed));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ddim-make-model: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
