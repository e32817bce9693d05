// Writes the valid seed files of the fuzz corpora (tests/fuzz/corpus/<harness>/), made by the
// project's own writers: small model files of several architectures and schedules (model,
// header), their graph and schedule metadata (metadata), .npy arrays of every dtype the readers
// take (npy), grayscale and RGB PNGs (png) and command lines of every subcommand (args).
// tests/fuzz/make-corpus runs it together with the malformed-file tests (DDIM_FUZZ_CORPUS_OUT).
//   fuzz_make_corpus OUT_DIR
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "ddim/ddim.hpp"
#include "format/container.hpp"
#include "graph/unet_builder.hpp"
#include "npy.hpp"
#include "png.hpp"

namespace {

using Bytes = std::vector<std::uint8_t>;
std::filesystem::path g_out;

void write(const std::string& harness, const std::string& name, const Bytes& bytes) {
  const auto folder = g_out / harness;
  std::filesystem::create_directories(folder);
  std::ofstream(folder / name, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

Bytes text_bytes(std::uint8_t first, const std::string& s) {
  Bytes b(1 + s.size());
  b[0] = first;
  std::memcpy(b.data() + 1, s.data(), s.size());
  return b;
}

// A .npy file with a hand-written header dict (for the dtypes the writer does not produce).
Bytes npy(const std::string& descr, const std::string& shape, const Bytes& data) {
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header.push_back(' ');
  header.push_back('\n');
  std::string file = "\x93NUMPY";
  file += char(1);
  file += char(0);
  file += char(header.size() & 0xff);
  file += char(header.size() >> 8);
  file += header;
  Bytes b(file.size() + data.size());
  std::memcpy(b.data(), file.data(), file.size());
  if (!data.empty()) std::memcpy(b.data() + file.size(), data.data(), data.size());
  return b;
}

template <typename T>
Bytes le(const std::vector<T>& values) {
  Bytes b(values.size() * sizeof(T));
  std::memcpy(b.data(), values.data(), b.size());
  return b;
}

void models() {
  struct Variant {
    const char* name;
    ddim::graph::UNetConfig unet;
    ddim::ScheduleConfig schedule;
  };
  std::vector<Variant> variants;
  ddim::graph::UNetConfig base;
  base.sample_height = 8;
  base.sample_width = 8;
  base.in_channels = 1;
  base.out_channels = 1;
  base.block_out_channels = {4, 8};
  base.down_attention = {false, true};
  base.layers_per_block = 1;
  base.norm_num_groups = 2;
  variants.push_back({"unet8", base, {}});
  ddim::graph::UNetConfig rgb = base;
  rgb.in_channels = rgb.out_channels = 3;
  rgb.sample_width = 4;
  rgb.attention_head_dim = 2;
  rgb.flip_sin_to_cos = false;
  rgb.freq_shift = 1.0;
  ddim::ScheduleConfig v;
  v.prediction_type = ddim::PredictionType::VPrediction;
  v.num_train_timesteps = 50;
  v.beta_schedule = ddim::BetaSchedule::SquaredCosCapV2;
  v.timestep_spacing = ddim::Spacing::Trailing;
  variants.push_back({"rgb_v", rgb, v});
  ddim::graph::UNetConfig flat = base;
  flat.block_out_channels = {4};
  flat.down_attention = {false};
  flat.add_attention = false;
  ddim::ScheduleConfig thr;
  thr.thresholding = true;
  thr.clip_sample = false;
  thr.num_train_timesteps = 20;
  variants.push_back({"flat_threshold", flat, thr});
  for (const auto& var : variants) {
    const Bytes file = ddim::graph::make_random_model_file(var.unet, var.schedule, 3);
    (void)ddim::Model::load_from_memory(file, var.name);  // a seed that does not load is no seed
    write("model", std::string(var.name) + ".ddim", file);
    const std::uint64_t n = ddim::format::read_header_length(std::span(file).first(8), file.size());
    const ddim::format::Container c = ddim::format::parse_header(std::span(file).subspan(8, n), file.size());
    Bytes header(8);
    const std::uint64_t data = file.size() - 8 - n;
    for (int i = 0; i < 8; ++i) header[std::size_t(i)] = std::uint8_t(data >> (8 * i));
    header.insert(header.end(), file.begin() + 8, file.begin() + 8 + std::ptrdiff_t(n));
    write("header", std::string(var.name) + ".json", header);
    write("metadata", std::string(var.name) + ".graph", text_bytes(0, c.metadata.at("ddim.graph")));
    write("metadata", std::string(var.name) + ".schedule", text_bytes(1, c.metadata.at("ddim.schedule")));
  }
}

void arrays() {
  std::vector<float> values(64);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = float(i) / 32.f - 1.f;
  const std::vector<std::int64_t> x_shape{1, 1, 8, 8}, small{2, 3}, scalar{}, vec{5};
  write("npy", "x_T.npy", ddim::tools::encode_npy_f32(x_shape, values));
  write("npy", "small.npy", ddim::tools::encode_npy_f32(small, std::span(values).first(6)));
  write("npy", "scalar.npy", ddim::tools::encode_npy_f32(scalar, std::span(values).first(1)));
  write("npy", "vec.npy", ddim::tools::encode_npy_f32(vec, std::span(values).first(5)));
  write("npy", "steps_i4.npy", npy("<i4", "(3,)", le(std::vector<std::int32_t>{999, 500, 1})));
  write("npy", "steps_i8.npy", npy("<i8", "(2,)", le(std::vector<std::int64_t>{800, 0})));
  write("npy", "steps_f8.npy", npy("<f8", "(2,)", le(std::vector<double>{900.0, 100.0})));
  write("npy", "fortran.npy", npy("<f4", "(2, 2)", le(std::vector<float>{1, 2, 3, 4})));

  std::vector<float> rgb(3 * 5 * 4);
  for (std::size_t i = 0; i < rgb.size(); ++i) rgb[i] = float(i % 17) / 8.f - 1.f;
  write("png", "gray8.png", ddim::tools::encode_png(ddim::tools::tensor_to_image(values, 1, 8, 8)));
  write("png", "rgb5x4.png",
        ddim::tools::encode_png(ddim::tools::tensor_to_image(rgb, 3, 5, 4), {{"ddim", "seed 3"}, {"Comment", "x"}}));
  write("png", "grid.png", ddim::tools::encode_png(ddim::tools::batch_to_grid(values, 4, 1, 4, 4)));
}

void command_lines() {
  const std::vector<std::pair<std::uint8_t, std::vector<std::string>>> lines = {
      {0, {"--model", "m.ddim", "--steps", "10", "--eta", "0.5", "--seed", "7", "--out", "o.png"}},
      {0, {"--model=m.ddim", "--batch", "4", "--seeds", "9,2,5,7", "--spacing", "trailing", "--device", "cpu"}},
      {0, {"--model", "m.ddim", "--timesteps", "999,500,1", "--precision", "fp32", "--threads", "2", "--clip-sample", "off"}},
      {1, {"--model", "m.ddim", "--t", "500", "--x", "x.npy", "--out", "eps.npy"}},
      {2, {"m.ddim", "--plan"}},
      {3, {"--model", "m.ddim", "--input", "a.png", "--steps", "20", "--model-time", "next", "--out", "x_T.npy"}},
      {4, {"--model", "m.ddim", "--seeds", "1,2", "--frames", "5", "--timesteps", "900,400"}},
      {5, {"--model", "m.ddim", "--seed", "3", "--batch", "2", "--steps-list", "10,20,50"}},
      {6, {"--model", "m.ddim", "--steps", "10", "--runs", "3", "--device", "cuda:0"}},
      {0, {"--help"}},
  };
  int i = 0;
  for (const auto& [command, args] : lines) {
    std::string line(1, char(command));
    for (std::size_t k = 0; k < args.size(); ++k) {
      if (k) line.push_back('\0');
      line += args[k];
    }
    write("args", "line" + std::to_string(i++), Bytes(line.begin(), line.end()));
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_corpus OUT_DIR\n");
    return 2;
  }
  g_out = argv[1];
  try {
    models();
    arrays();
    command_lines();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz_make_corpus: %s\n", e.what());
    return 1;
  }
  return 0;
}
