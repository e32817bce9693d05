#pragma once
// Helpers shared by the C++ tests: small model files the tests write themselves.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "ddim/ddim.hpp"
#include "graph/decoder.hpp"
#include "graph/unet_builder.hpp"

namespace ddim::test {

// Same length and the same bits in every element.
inline bool bitwise_equal(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Runs f, which must throw ddim::Error(InvalidArgument); returns the message (for CHECKs on it).
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const ddim::Error& e) {
    CHECK(e.code() == ddim::ErrorCode::InvalidArgument);
    return e.what();
  }
  FAIL("expected a ddim::Error");
  return {};
}

// A small U-Net of the DDPM family: two levels (16, 32 channels), multi-head attention at the
// second, non-square 16x12 samples, groups of 8.
inline graph::UNetConfig tiny_unet() {
  graph::UNetConfig c;
  c.sample_height = 16;
  c.sample_width = 12;
  c.in_channels = 3;
  c.out_channels = 3;
  c.block_out_channels = {16, 32};
  c.down_attention = {false, true};
  c.layers_per_block = 1;
  c.attention_head_dim = 8;
  c.norm_num_groups = 8;
  c.norm_eps = 1e-6;
  c.downsample_padding = 0;
  c.flip_sin_to_cos = false;
  c.freq_shift = 1.0;
  return c;
}

inline std::shared_ptr<const Model> tiny_model(std::uint64_t seed = 1, ScheduleConfig schedule = {}) {
  auto bytes = graph::make_random_model_file(tiny_unet(), schedule, seed);
  return Model::load_from_memory(bytes, "tiny");
}

inline std::unique_ptr<Session> cpu_session(std::shared_ptr<const Model> model, int batch, int threads = 2) {
  SessionOptions o;
  o.backend = BackendKind::Cpu;
  o.batch = batch;
  o.threads = threads;
  return Session::create(std::move(model), o);
}

// ---- the `ddim` tool, for CLI tests (DDIM_CLI_PATH is set by the test build)
struct CliRun {
  int code;
  std::string output;  // stdout and stderr
};

inline CliRun run_cli(const std::string& args) {
  const std::string cmd = std::string(DDIM_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  REQUIRE(p != nullptr);
  std::string out;
  char buf[4096];
  while (std::size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

// A fresh scratch folder, removed at scope exit.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           ("ddim_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

// A small latent model (format version 2): tiny_unet() on 4-channel 8x6 latents and a decoder
// ("vq": 32-entry codebook, post_quant_conv 4 -> 3; "kl": AutoencoderKL) of channels (8, 16),
// factor 2, scaling_factor 0.5: 16x12 RGB images.
inline graph::UNetConfig small_latent_unet() {
  graph::UNetConfig u = tiny_unet();
  u.sample_height = 8;
  u.sample_width = 6;
  u.in_channels = u.out_channels = 4;
  return u;
}
inline graph::DecoderConfig small_decoder(const std::string& kind) {
  graph::DecoderConfig d;
  d.decoder = kind;
  d.component = kind == "vq" ? "vqvae" : "vae";
  d.latent_channels = 4;
  d.decoder_in_channels = kind == "vq" ? 3 : 4;
  d.num_vq_embeddings = 32;
  d.block_out_channels = {8, 16};
  d.layers_per_block = 1;
  d.norm_num_groups = 4;
  d.latent_height = 8;
  d.latent_width = 6;
  d.scaling_factor = 0.5;
  return d;
}
inline std::shared_ptr<const Model> latent_model(const std::string& kind, std::uint64_t seed = 3) {
  auto bytes = graph::make_random_latent_model_file(small_latent_unet(), small_decoder(kind), ScheduleConfig{}, seed);
  return Model::load_from_memory(bytes, "latent-" + kind);
}

}  // namespace ddim::test
