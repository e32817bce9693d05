#include "graph/unet_builder.hpp"

#include <cmath>

#include "ddim/error.hpp"
#include "format/model_metadata.hpp"

namespace ddim::graph {

using nlohmann::json;

UNetConfig UNetConfig::cifar10() {
  UNetConfig c;
  c.block_out_channels = {128, 256, 256, 256};
  c.down_attention = {false, true, false, false};
  c.norm_eps = 1e-6;
  c.downsample_padding = 0;
  c.flip_sin_to_cos = false;
  c.freq_shift = 1.0;
  return c;
}

UNetConfig UNetConfig::celebahq256() {
  UNetConfig c = cifar10();  // the same block structure and embedding settings
  c.sample_height = c.sample_width = 256;
  c.block_out_channels = {128, 128, 256, 256, 512, 512};
  c.down_attention = {false, false, false, false, true, false};
  return c;
}

std::int64_t BuiltUNet::parameter_count() const {
  std::int64_t total = 0;
  for (const auto& [name, shape] : params) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    total += n;
  }
  return total;
}

namespace {

class Builder {
 public:
  json nodes = json::array();
  std::vector<std::pair<std::string, std::vector<std::int64_t>>> params;

  std::string node(const std::string& name, const char* op, std::vector<std::string> inputs, json attrs = json::object(),
                   json p = json::object()) {
    json n = {{"name", name}, {"op", op}, {"inputs", inputs}};
    if (!attrs.empty()) n["attrs"] = std::move(attrs);
    if (!p.empty()) n["params"] = std::move(p);
    nodes.push_back(std::move(n));
    return name;
  }
  json param(const std::string& prefix, const std::string& role, const std::string& suffix, std::vector<std::int64_t> shape,
             json& p) {
    params.push_back({prefix + "." + suffix, std::move(shape)});
    p[role] = prefix + "." + suffix;
    return p;
  }
  std::string conv(const std::string& name, const std::string& x, int cin, int cout, int k, json padding, int stride = 1) {
    json p = json::object();
    param(name, "weight", "weight", {cout, cin, k, k}, p);
    param(name, "bias", "bias", {cout}, p);
    return node(name, "conv2d", {x}, {{"out_channels", cout}, {"kernel", k}, {"stride", stride}, {"padding", padding}}, p);
  }
  std::string linear(const std::string& name, const std::string& x, int in, int out) {
    json p = json::object();
    param(name, "weight", "weight", {out, in}, p);
    param(name, "bias", "bias", {out}, p);
    return node(name, "linear", {x}, {{"out_features", out}}, p);
  }
  std::string group_norm(const std::string& name, const std::string& x, int c, int groups, double eps, bool silu) {
    json p = json::object();
    param(name, "weight", "weight", {c}, p);
    param(name, "bias", "bias", {c}, p);
    return node(name, "group_norm", {x}, {{"groups", groups}, {"eps", eps}, {"silu", silu}}, p);
  }
  // diffusers ResnetBlock2D (time_embedding_norm "default").
  std::string resnet(const std::string& name, const std::string& x, int cin, int cout, const std::string& temb, int temb_c,
                     const UNetConfig& c, double output_scale_factor) {
    std::string h = group_norm(name + ".norm1", x, cin, c.norm_num_groups, c.norm_eps, true);
    h = conv(name + ".conv1", h, cin, cout, 3, 1);
    std::string t = linear(name + ".time_emb_proj", temb, temb_c, cout);
    h = node(name + ".add_temb", "add", {h, t});
    h = group_norm(name + ".norm2", h, cout, c.norm_num_groups, c.norm_eps, true);
    h = conv(name + ".conv2", h, cout, cout, 3, 1);
    std::string skip = x;
    if (cin != cout) skip = conv(name + ".conv_shortcut", x, cin, cout, 1, 0);
    json attrs = json::object();
    if (output_scale_factor != 1.0) attrs["divisor"] = output_scale_factor;
    return node(name + ".add_residual", "add", {skip, h}, attrs);
  }
  // diffusers Attention with group_norm and residual_connection (the DDPM attention block).
  std::string attention(const std::string& name, const std::string& x, int ch, const UNetConfig& c, std::optional<int> head_dim,
                        double rescale) {
    const int hd = head_dim.value_or(ch);
    const int heads = ch / hd;
    std::string h = group_norm(name + ".group_norm", x, ch, c.norm_num_groups, c.norm_eps, false);
    json p = json::object();
    for (const char* r : {"q", "k", "v"}) {
      param(name + ".to_" + r, std::string(r) + "_weight", "weight", {heads * hd, ch}, p);
      param(name + ".to_" + r, std::string(r) + "_bias", "bias", {heads * hd}, p);
    }
    param(name + ".to_out.0", "out_weight", "weight", {ch, heads * hd}, p);
    param(name + ".to_out.0", "out_bias", "bias", {ch}, p);
    json attrs = {{"heads", heads}};
    if (heads * hd != ch) attrs["inner_dim"] = heads * hd;
    if (rescale != 1.0) attrs["rescale_output_factor"] = rescale;
    return node(name, "attention", {h, x}, attrs, p);
  }
};

}  // namespace

BuiltUNet build_unet2d(const UNetConfig& c) {
  const std::size_t levels = c.block_out_channels.size();
  if (levels == 0 || c.down_attention.size() != levels)
    throw Error(ErrorCode::InvalidArgument, "unet: down_attention needs one entry per block_out_channels entry");
  std::vector<bool> up_attention = c.up_attention;
  if (up_attention.empty()) up_attention.assign(c.down_attention.rbegin(), c.down_attention.rend());
  if (up_attention.size() != levels) throw Error(ErrorCode::InvalidArgument, "unet: up_attention needs one entry per level");

  Builder b;
  const int ch0 = c.block_out_channels[0];
  const int temb_c = ch0 * 4;
  std::string t = b.node("time_proj", "timestep_embedding", {"timestep"},
                         {{"dim", ch0}, {"flip_sin_to_cos", c.flip_sin_to_cos}, {"freq_shift", c.freq_shift}});
  t = b.linear("time_embedding.linear_1", t, ch0, temb_c);
  t = b.node("time_embedding.act", "silu", {t});
  t = b.linear("time_embedding.linear_2", t, temb_c, temb_c);
  json class_input;
  if (c.class_kind != ClassKind::None) {
    std::string ce;
    if (c.class_kind == ClassKind::Index) {
      if (c.num_classes < 1) throw Error(ErrorCode::InvalidArgument, "unet: num_classes must be at least 1");
      class_input = {{"kind", "index"}, {"num_classes", c.num_classes}};
      json p = json::object();
      b.param("class_embedding", "weight", "weight", {c.num_classes, temb_c}, p);
      ce = b.node("class_embedding", "embedding", {"class_labels"}, {{"num_embeddings", c.num_classes}, {"dim", temb_c}}, p);
    } else if (c.class_kind == ClassKind::Scalar) {
      class_input = {{"kind", "scalar"}};
      // diffusers applies the same time_proj module to the labels.
      ce = b.node("class_proj", "timestep_embedding", {"class_labels"},
                  {{"dim", ch0}, {"flip_sin_to_cos", c.flip_sin_to_cos}, {"freq_shift", c.freq_shift}});
      ce = b.linear("class_embedding.linear_1", ce, ch0, temb_c);
      ce = b.node("class_embedding.act", "silu", {ce});
      ce = b.linear("class_embedding.linear_2", ce, temb_c, temb_c);
    } else {
      class_input = {{"kind", "vector"}, {"dim", temb_c}};
      ce = "class_labels";
    }
    if (!c.class_null.empty()) {
      if (c.class_kind == ClassKind::Vector) class_input["null"] = c.class_null;
      else if (c.class_kind == ClassKind::Index) class_input["null"] = int(c.class_null[0]);
      else class_input["null"] = c.class_null[0];
    }
    t = b.node("class_embedding.add", "add", {t, ce});
  }
  // Every ResnetBlock2D applies SiLU to the embedding first; one shared node computes it.
  const std::string temb = b.node("time_embedding.silu_out", "silu", {t});

  std::string x = "sample";
  if (c.center_input_sample) x = b.node("center_input_sample", "scale", {x}, {{"scale", 2.0}, {"shift", -1.0}});
  x = b.conv("conv_in", x, c.in_channels, ch0, 3, 1);
  std::vector<std::pair<std::string, int>> skips{{x, ch0}};

  int out_c = ch0;
  for (std::size_t i = 0; i < levels; ++i) {
    const int in_c = out_c;
    out_c = c.block_out_channels[i];
    const std::string blk = "down_blocks." + std::to_string(i);
    for (int j = 0; j < c.layers_per_block; ++j) {
      x = b.resnet(blk + ".resnets." + std::to_string(j), x, j == 0 ? in_c : out_c, out_c, temb, temb_c, c, 1.0);
      if (c.down_attention[i])
        x = b.attention(blk + ".attentions." + std::to_string(j), x, out_c, c, c.attention_head_dim, 1.0);
      skips.push_back({x, out_c});
    }
    if (i + 1 < levels) {
      const std::string name = blk + ".downsamplers.0.conv";
      json pad = c.downsample_padding == 0 ? json::array({0, 1, 0, 1}) : json(c.downsample_padding);
      x = b.conv(name, x, out_c, out_c, 3, pad, 2);
      skips.push_back({x, out_c});
    }
  }

  const int mid_c = c.block_out_channels.back();
  x = b.resnet("mid_block.resnets.0", x, mid_c, mid_c, temb, temb_c, c, c.mid_block_scale_factor);
  if (c.add_attention) x = b.attention("mid_block.attentions.0", x, mid_c, c, c.attention_head_dim, c.mid_block_scale_factor);
  x = b.resnet("mid_block.resnets.1", x, mid_c, mid_c, temb, temb_c, c, c.mid_block_scale_factor);

  std::vector<int> rev(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  int prev_c = rev[0];
  out_c = rev[0];
  for (std::size_t i = 0; i < levels; ++i) {
    prev_c = out_c;
    out_c = rev[i];
    const int in_c = rev[std::min(i + 1, levels - 1)];
    const std::string blk = "up_blocks." + std::to_string(i);
    const int layers = c.layers_per_block + 1;
    for (int j = 0; j < layers; ++j) {
      auto [skip, skip_c] = skips.back();
      skips.pop_back();
      const int res_in = j == 0 ? prev_c : out_c;
      const int expect_skip = j == layers - 1 ? in_c : out_c;
      if (skip_c != expect_skip) throw Error(ErrorCode::Internal, "unet builder: skip channel mismatch");
      const std::string name = blk + ".resnets." + std::to_string(j);
      x = b.node(name + ".concat", "concat", {x, skip});
      x = b.resnet(name, x, res_in + skip_c, out_c, temb, temb_c, c, 1.0);
      if (up_attention[i]) x = b.attention(blk + ".attentions." + std::to_string(j), x, out_c, c, c.attention_head_dim, 1.0);
    }
    if (i + 1 < levels) {
      x = b.node(blk + ".upsamplers.0.interpolate", "upsample_nearest2x", {x});
      x = b.conv(blk + ".upsamplers.0.conv", x, out_c, out_c, 3, 1);
    }
  }
  x = b.group_norm("conv_norm_out", x, ch0, c.norm_num_groups, c.norm_eps, true);
  x = b.conv("conv_out", x, ch0, c.out_channels, 3, 1);

  BuiltUNet out;
  out.graph = {{"inputs", {{"sample", {{"channels", c.in_channels}, {"height", c.sample_height}, {"width", c.sample_width}}},
                           {"timestep", json::object()}}},
               {"output", x},
               {"nodes", std::move(b.nodes)}};
  if (!class_input.is_null()) out.graph["inputs"]["class_labels"] = class_input;
  out.params = std::move(b.params);
  return out;
}

std::vector<std::uint8_t> make_random_model_file(const UNetConfig& config, const ScheduleConfig& schedule, std::uint64_t seed,
                                                 format::DType dtype) {
  BuiltUNet net = build_unet2d(config);
  std::uint64_t state = seed * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  auto next_unit = [&]() {  // splitmix64 -> uniform [-1, 1)
    std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return double(z >> 11) * 0x1.0p-52 - 1.0;
  };
  std::vector<format::TensorData> tensors;
  std::vector<float> values;
  for (const auto& [name, shape] : net.params) {
    std::int64_t numel = 1, fan_in = 1;
    for (auto d : shape) numel *= d;
    for (std::size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
    const bool is_norm = name.find("norm") != std::string::npos;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    values.resize(std::size_t(numel));
    for (auto& v : values) {
      if (is_norm) v = float((is_bias ? 0.0 : 1.0) + 0.1 * next_unit());
      else if (is_bias) v = float(0.05 * next_unit());
      else v = float(next_unit() / std::sqrt(double(fan_in)));
    }
    tensors.push_back(format::make_tensor_f32(name, shape, values, dtype));
  }
  std::map<std::string, std::string> meta = format::make_metadata(net.graph, schedule);
  return format::serialize(tensors, meta);
}

}  // namespace ddim::graph
