// Latent models: the `ddim.latent` and `ddim.decoder` keys (weights/FORMAT.md section 9) and a
// builder of diffusers' VQModel / AutoencoderKL decoders.
#include "graph/decoder.hpp"

#include <cmath>

#include "ddim/error.hpp"
#include "format/model_metadata.hpp"

namespace ddim::graph {

using nlohmann::json;

namespace {

const char* const kHint = " (re-export the model with tools/export.py; the schema is in weights/FORMAT.md section 9)";

[[noreturn]] void fail(const std::string& msg) {
  throw Error(ErrorCode::InvalidFile, format::detail::bounded_message(msg + kHint));
}

}  // namespace

LatentConfig parse_latent_config(const json& j) {
  if (!j.is_object()) fail("ddim.latent must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    if (k != "decoder" && k != "component" && k != "scaling_factor" && k != "shift_factor" && k != "factor")
      fail("ddim.latent has unknown key '" + k + "' (expected decoder, component, scaling_factor, shift_factor, factor)");
  }
  LatentConfig c;
  auto str = [&](const char* key) {
    auto it = j.find(key);
    if (it == j.end() || !it->is_string()) fail(std::string("ddim.latent '") + key + "' must be a string");
    return it->get<std::string>();
  };
  c.decoder = str("decoder");
  if (c.decoder != "vq" && c.decoder != "kl") fail("ddim.latent 'decoder' must be \"vq\" or \"kl\", got \"" + c.decoder + "\"");
  c.component = str("component");
  if (c.component.empty() || c.component.size() > 64 || c.component.find('.') != std::string::npos)
    fail("ddim.latent 'component' must be a non-empty name without dots (the tensor-name prefix, e.g. \"vqvae\")");
  auto it = j.find("scaling_factor");
  if (it == j.end() || !it->is_number() || !std::isfinite(it->get<double>()) || !(it->get<double>() > 0))
    fail("ddim.latent 'scaling_factor' must be a positive finite number");
  c.scaling_factor = it->get<double>();
  if (auto s = j.find("shift_factor"); s != j.end()) {
    if (!s->is_number() || !std::isfinite(s->get<double>())) fail("ddim.latent 'shift_factor' must be a finite number");
    c.shift_factor = s->get<double>();
  }
  it = j.find("factor");
  if (it == j.end() || !it->is_number_integer() || it->get<std::int64_t>() < 1 || it->get<std::int64_t>() > 64)
    fail("ddim.latent 'factor' must be an integer in [1, 64] (image size / latent size)");
  c.factor = int(it->get<std::int64_t>());
  return c;
}

json latent_config_to_json(const LatentConfig& c) {
  return {{"decoder", c.decoder}, {"component", c.component}, {"scaling_factor", c.scaling_factor},
          {"shift_factor", c.shift_factor}, {"factor", c.factor}};
}

Graph parse_decoder_graph(const json& j, int factor) {
  if (!j.is_object()) fail("ddim.decoder must be a JSON object");
  auto inputs = j.find("inputs");
  if (inputs == j.end() || !inputs->is_object()) fail("ddim.decoder: 'inputs' must be an object with 'sample'");
  for (auto it = inputs->begin(); it != inputs->end(); ++it)
    if (it.key() != "sample") fail("ddim.decoder: unknown input '" + it.key() + "' (a decoder's only input is 'sample')");
  // The IR's executors run graphs with a timestep input; the decoder's is declared here, unused.
  json k = j;
  k["inputs"]["timestep"] = json::object();
  try {
    return parse_graph(k, factor);
  } catch (const Error& e) {
    throw Error(e.code(), std::string("ddim.decoder: ") + e.what());
  }
}

// ------------------------------------------------------------------------------- the builder

DecoderConfig DecoderConfig::ldm_celebahq256() { return DecoderConfig{}; }

std::int64_t BuiltDecoder::parameter_count() const {
  std::int64_t total = 0;
  for (const auto& [name, shape] : params) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    total += n;
  }
  return total;
}

namespace {

class DecoderBuilder {
 public:
  DecoderBuilder(const DecoderConfig& c) : c_(c), prefix_(c.component + ".") {}
  json nodes = json::array();
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> params;

  std::string node(const std::string& name, const char* op, std::vector<std::string> inputs, json attrs = json::object(),
                   json p = json::object()) {
    json n = {{"name", prefix_ + name}, {"op", op}, {"inputs", inputs}};
    if (!attrs.empty()) n["attrs"] = std::move(attrs);
    if (!p.empty()) n["params"] = std::move(p);
    nodes.push_back(std::move(n));
    return prefix_ + name;
  }
  void param(const std::string& module, const std::string& role, const std::string& leaf, std::vector<std::int64_t> shape,
             json& p) {
    params.push_back({prefix_ + module + "." + leaf, std::move(shape)});
    p[role] = prefix_ + module + "." + leaf;
  }
  std::string conv(const std::string& name, const std::string& x, int cin, int cout, int k) {
    json p = json::object();
    param(name, "weight", "weight", {cout, cin, k, k}, p);
    param(name, "bias", "bias", {cout}, p);
    return node(name, "conv2d", {x}, {{"out_channels", cout}, {"kernel", k}, {"stride", 1}, {"padding", k / 2}}, p);
  }
  std::string group_norm(const std::string& name, const std::string& x, int c, bool silu) {
    json p = json::object();
    param(name, "weight", "weight", {c}, p);
    param(name, "bias", "bias", {c}, p);
    return node(name, "group_norm", {x}, {{"groups", c_.norm_num_groups}, {"eps", 1e-6}, {"silu", silu}}, p);
  }
  // ResnetBlock2D with temb None (eps 1e-6, output_scale_factor 1).
  std::string resnet(const std::string& name, const std::string& x, int cin, int cout) {
    std::string h = group_norm(name + ".norm1", x, cin, true);
    h = conv(name + ".conv1", h, cin, cout, 3);
    h = group_norm(name + ".norm2", h, cout, true);
    h = conv(name + ".conv2", h, cout, cout, 3);
    std::string skip = x;
    if (cin != cout) skip = conv(name + ".conv_shortcut", x, cin, cout, 1);
    return node(name + ".add_residual", "add", {skip, h});
  }
  // Attention with group_norm, one head as wide as the channels, residual_connection.
  std::string attention(const std::string& name, const std::string& x, int ch) {
    std::string h = group_norm(name + ".group_norm", x, ch, false);
    json p = json::object();
    for (const char* r : {"q", "k", "v"}) {
      param(name + ".to_" + r, std::string(r) + "_weight", "weight", {ch, ch}, p);
      param(name + ".to_" + r, std::string(r) + "_bias", "bias", {ch}, p);
    }
    param(name + ".to_out.0", "out_weight", "weight", {ch, ch}, p);
    param(name + ".to_out.0", "out_bias", "bias", {ch}, p);
    return node(name, "attention", {h, x}, {{"heads", 1}}, p);
  }

 private:
  const DecoderConfig& c_;
  std::string prefix_;
};

}  // namespace

BuiltDecoder build_decoder(const DecoderConfig& c) {
  if (c.decoder != "vq" && c.decoder != "kl") throw Error(ErrorCode::InvalidArgument, "decoder: type must be vq or kl");
  if (c.block_out_channels.empty() || c.block_out_channels.size() > 7 || c.layers_per_block < 1)
    throw Error(ErrorCode::InvalidArgument, "decoder: 1 to 7 levels and at least one layer per block");
  DecoderBuilder b(c);
  std::string x = "sample";
  if (c.decoder == "vq") {
    json p = json::object();
    b.param("quantize.embedding", "codebook", "weight", {c.num_vq_embeddings, c.latent_channels}, p);
    x = b.node("quantize", "vector_quantize", {x}, {{"entries", c.num_vq_embeddings}}, p);
  }
  int ch = c.latent_channels;
  if (c.use_post_quant_conv || c.decoder == "vq") {
    x = b.conv("post_quant_conv", x, ch, c.decoder_in_channels, 1);
    ch = c.decoder_in_channels;
  } else if (c.decoder_in_channels != ch) {
    throw Error(ErrorCode::InvalidArgument, "decoder: without post_quant_conv the latents must have the decoder's channels");
  }
  const int top = c.block_out_channels.back();
  x = b.conv("decoder.conv_in", x, ch, top, 3);
  x = b.resnet("decoder.mid_block.resnets.0", x, top, top);
  if (c.mid_block_add_attention) x = b.attention("decoder.mid_block.attentions.0", x, top);
  x = b.resnet("decoder.mid_block.resnets.1", x, top, top);
  const std::size_t levels = c.block_out_channels.size();
  int prev = top;
  for (std::size_t i = 0; i < levels; ++i) {
    const int out = c.block_out_channels[levels - 1 - i];
    const std::string blk = "decoder.up_blocks." + std::to_string(i);
    for (int j = 0; j <= c.layers_per_block; ++j) {
      x = b.resnet(blk + ".resnets." + std::to_string(j), x, j == 0 ? prev : out, out);
    }
    prev = out;
    if (i + 1 < levels) {
      x = b.node(blk + ".upsamplers.0.interpolate", "upsample_nearest2x", {x});
      x = b.conv(blk + ".upsamplers.0.conv", x, out, out, 3);
    }
  }
  x = b.group_norm("decoder.conv_norm_out", x, c.block_out_channels[0], true);
  x = b.conv("decoder.conv_out", x, c.block_out_channels[0], c.out_channels, 3);

  BuiltDecoder out;
  out.graph = {{"inputs", {{"sample", {{"channels", c.latent_channels}, {"height", c.latent_height}, {"width", c.latent_width}}}}},
               {"output", x},
               {"nodes", std::move(b.nodes)}};
  out.params = std::move(b.params);
  out.latent = {c.decoder, c.component, c.scaling_factor, c.shift_factor, c.factor()};
  return out;
}

std::map<std::string, std::string> make_latent_metadata(const json& unet_graph, const ScheduleConfig& schedule,
                                                        const BuiltDecoder& decoder) {
  std::map<std::string, std::string> meta = format::make_metadata(unet_graph, schedule);
  meta["ddim.format_version"] = "2";
  meta["ddim.decoder"] = decoder.graph.dump();
  meta["ddim.latent"] = latent_config_to_json(decoder.latent).dump();
  return meta;
}

void append_random_tensors(const std::vector<std::pair<std::string, std::vector<std::int64_t>>>& params, std::uint64_t& state,
                           format::DType dtype, std::vector<format::TensorData>& out) {
  auto next_unit = [&]() {  // splitmix64 -> uniform [-1, 1)
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return double(z >> 11) * 0x1.0p-52 - 1.0;
  };
  std::vector<float> values;
  for (const auto& [name, shape] : params) {
    std::int64_t numel = 1, fan_in = 1;
    for (auto d : shape) numel *= d;
    for (std::size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
    const bool is_norm = name.find("norm") != std::string::npos;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const bool is_codebook = name.find("quantize.embedding") != std::string::npos;
    values.resize(std::size_t(numel));
    for (auto& v : values) {
      if (is_codebook) v = float(next_unit());
      else if (is_norm) v = float((is_bias ? 0.0 : 1.0) + 0.1 * next_unit());
      else if (is_bias) v = float(0.05 * next_unit());
      else v = float(next_unit() / std::sqrt(double(fan_in)));
    }
    out.push_back(format::make_tensor_f32(name, shape, values, dtype));
  }
}

UNetConfig ldm_celebahq256_unet() {
  UNetConfig c;  // the defaults: norm_eps 1e-5, downsample_padding 1, flip_sin_to_cos, freq_shift 0
  c.sample_height = c.sample_width = 64;
  c.in_channels = c.out_channels = 3;
  c.block_out_channels = {224, 448, 672, 896};
  c.down_attention = {false, true, true, true};
  c.layers_per_block = 2;
  c.attention_head_dim = 32;
  c.norm_num_groups = 32;
  return c;
}

ScheduleConfig ldm_celebahq256_schedule() {
  ScheduleConfig s;
  s.num_train_timesteps = 1000;
  s.beta_schedule = BetaSchedule::ScaledLinear;
  s.beta_start = 0.0015;
  s.beta_end = 0.0195;
  s.clip_sample = false;
  return s;
}

std::vector<std::uint8_t> make_random_latent_model_file(const UNetConfig& unet, const DecoderConfig& decoder,
                                                        const ScheduleConfig& schedule, std::uint64_t seed, format::DType dtype) {
  const BuiltUNet net = build_unet2d(unet);
  const BuiltDecoder dec = build_decoder(decoder);
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  std::vector<format::TensorData> tensors;
  append_random_tensors(net.params, state, dtype, tensors);
  append_random_tensors(dec.params, state, dtype, tensors);
  return format::serialize(tensors, make_latent_metadata(net.graph, schedule, dec));
}

}  // namespace ddim::graph
