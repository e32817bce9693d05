// Graph IR: parsing of the `ddim.graph` JSON, shape inference and parameter requirements.
#include "graph/ir.hpp"

#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

#include "ddim/error.hpp"
#include "ddim/session.hpp"
#include "format/container.hpp"

namespace ddim::graph {

using nlohmann::json;

namespace {

const char* const kHint = " (re-export the model with tools/export.py; the schema is in weights/FORMAT.md)";

[[noreturn]] void fail(const std::string& msg) {
  throw Error(ErrorCode::InvalidFile, format::detail::bounded_message("graph: " + msg + kHint));
}

struct OpSpec {
  Op op;
  const char* name;
  int min_inputs, max_inputs;
  std::set<std::string> attrs;
  std::set<std::string> params;           // allowed roles
  std::set<std::string> required_params;  // mandatory roles
};

const std::vector<OpSpec>& op_specs() {
  static const std::vector<OpSpec> specs = {
      {Op::TimestepEmbedding, "timestep_embedding", 1, 1, {"dim", "flip_sin_to_cos", "freq_shift", "max_period", "scale"}, {}, {}},
      {Op::Linear, "linear", 1, 1, {"out_features"}, {"weight", "bias"}, {"weight"}},
      {Op::Conv2d, "conv2d", 1, 1, {"out_channels", "kernel", "stride", "padding"}, {"weight", "bias"}, {"weight"}},
      {Op::GroupNorm, "group_norm", 1, 1, {"groups", "eps", "silu"}, {"weight", "bias"}, {}},
      {Op::Silu, "silu", 1, 1, {}, {}, {}},
      {Op::Add, "add", 2, 2, {"divisor"}, {}, {}},
      {Op::Scale, "scale", 1, 1, {"scale", "shift"}, {}, {}},
      {Op::Concat, "concat", 2, 64, {}, {}, {}},
      {Op::UpsampleNearest2x, "upsample_nearest2x", 1, 1, {}, {}, {}},
      {Op::AvgPool2x, "avg_pool2x", 1, 1, {}, {}, {}},
      {Op::Attention, "attention", 1, 2, {"heads", "inner_dim", "scale", "rescale_output_factor"},
       {"q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "out_weight", "out_bias"},
       {"q_weight", "k_weight", "v_weight", "out_weight"}},
      {Op::Embedding, "embedding", 1, 1, {"num_embeddings", "dim"}, {"weight"}, {"weight"}},
      {Op::VectorQuantize, "vector_quantize", 1, 1, {"entries"}, {"codebook"}, {"codebook"}},
  };
  return specs;
}

// Typed attribute access with the node named in every error.
class Attrs {
 public:
  Attrs(const json* j, const std::string& node) : j_(j), node_(node) {}

  const json* get(const char* key) const {
    if (!j_) return nullptr;
    auto it = j_->find(key);
    return it == j_->end() ? nullptr : &*it;
  }
  std::string where(const char* key) const { return "node '" + node_ + "' attribute '" + key + "'"; }

  int integer(const char* key, std::optional<int> dflt, int min_value) const {
    const json* v = get(key);
    if (!v) {
      if (!dflt) fail(where(key) + " is required");
      return *dflt;
    }
    if (!v->is_number_integer()) fail(where(key) + " must be an integer, got " + format::detail::short_json(*v));
    auto x = v->get<std::int64_t>();
    if (x < min_value || x > std::numeric_limits<int>::max())
      fail(where(key) + " = " + std::to_string(x) + " is out of range (minimum " + std::to_string(min_value) + ")");
    return static_cast<int>(x);
  }
  double number(const char* key, double dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    if (!v->is_number()) fail(where(key) + " must be a number, got " + format::detail::short_json(*v));
    double x = v->get<double>();
    if (!std::isfinite(x)) fail(where(key) + " must be finite");
    return x;
  }
  bool boolean(const char* key, bool dflt) const {
    const json* v = get(key);
    if (!v) return dflt;
    if (!v->is_boolean()) fail(where(key) + " must be true or false, got " + format::detail::short_json(*v));
    return v->get<bool>();
  }
  // An int or a list of `n` ints (each >= min_value), or (when n2 > 0) a list of n2 ints.
  std::vector<int> ints(const char* key, std::vector<int> dflt, std::size_t n, std::size_t n2, int min_value) const {
    const json* v = get(key);
    if (!v) {
      if (dflt.empty()) fail(where(key) + " is required");
      return dflt;
    }
    std::vector<int> out;
    auto take = [&](const json& e) {
      if (!e.is_number_integer()) fail(where(key) + " must hold integers, got " + format::detail::short_json(*v));
      auto x = e.get<std::int64_t>();
      if (x < min_value || x > 1 << 20) fail(where(key) + " has an out-of-range entry " + std::to_string(x));
      out.push_back(static_cast<int>(x));
    };
    if (v->is_number_integer()) {
      take(*v);
      out.assign(n, out[0]);
      return out;
    }
    if (!v->is_array() || (v->size() != n && (n2 == 0 || v->size() != n2)))
      fail(where(key) + " must be an integer or a list of " + std::to_string(n) +
           (n2 ? " or " + std::to_string(n2) : std::string()) + " integers, got " + format::detail::short_json(*v));
    for (const auto& e : *v) take(e);
    return out;
  }

 private:
  const json* j_;
  const std::string& node_;
};

std::string shape_str(const Value& v) {
  std::ostringstream s;
  if (v.kind == Kind::Timestep) return "timestep";
  if (v.kind == Kind::Vector) s << "(" << v.c << ")";
  else s << "(" << v.c << ", " << v.h << ", " << v.w << ")";
  return s.str();
}

}  // namespace

const char* to_string(Op op) noexcept {
  for (const auto& s : op_specs())
    if (s.op == op) return s.name;
  return "?";
}

const char* to_string(ClassKind k) noexcept {
  switch (k) {
    case ClassKind::None: return "none";
    case ClassKind::Index: return "index";
    case ClassKind::Scalar: return "scalar";
    case ClassKind::Vector: return "vector";
  }
  return "?";
}

namespace {

// The declaration of the optional input `class_labels`:
//   {"kind": "index", "num_classes": K [, "null": label]}   integer labels in [0, K)
//   {"kind": "scalar" [, "null": value]}                      one real number per sample
//   {"kind": "vector", "dim": D [, "null": [D numbers]]}      D numbers per sample
ClassInput parse_class_input(const json& j) {
  const std::string who = "input 'class_labels'";
  if (!j.is_object()) fail(who + " must be an object {kind, ...}");
  auto kind_it = j.find("kind");
  if (kind_it == j.end() || !kind_it->is_string()) fail(who + " needs a string 'kind' (index, scalar or vector)");
  ClassInput c;
  const std::string kind = kind_it->get<std::string>();
  std::set<std::string> allowed{"kind", "null"};
  if (kind == "index") {
    c.kind = ClassKind::Index;
    allowed.insert("num_classes");
  } else if (kind == "scalar") {
    c.kind = ClassKind::Scalar;
  } else if (kind == "vector") {
    c.kind = ClassKind::Vector;
    allowed.insert("dim");
  } else {
    fail(who + " has unknown kind '" + kind + "' (expected index, scalar or vector)");
  }
  for (auto it = j.begin(); it != j.end(); ++it)
    if (!allowed.count(it.key())) fail(who + " (kind " + kind + ") has unknown key '" + it.key() + "'");
  const std::string name = "class_labels";
  Attrs a(&j, name);
  if (c.kind == ClassKind::Index) c.num_classes = a.integer("num_classes", std::nullopt, 1);
  if (c.kind == ClassKind::Vector) c.dim = a.integer("dim", std::nullopt, 1);
  if (c.num_classes > (1 << 24) || c.dim > (1 << 24)) fail(who + ": num_classes and dim must be at most 2^24");
  auto null_it = j.find("null");
  if (null_it == j.end()) return c;
  auto finite_float = [&](const json& v) {
    if (!v.is_number()) fail(who + " 'null' must hold numbers, got " + format::detail::short_json(v));
    const double x = v.get<double>();
    if (!std::isfinite(x) || std::fabs(x) > 3.0e38) fail(who + " 'null' must be finite float32 values");
    return float(x);
  };
  if (c.kind == ClassKind::Vector) {
    if (!null_it->is_array() || int(null_it->size()) != c.dim)
      fail(who + " 'null' must be a list of dim = " + std::to_string(c.dim) + " numbers");
    for (const auto& v : *null_it) c.null.push_back(finite_float(v));
  } else if (c.kind == ClassKind::Index) {
    if (!null_it->is_number_integer() || null_it->get<std::int64_t>() < 0 || null_it->get<std::int64_t>() >= c.num_classes)
      fail(who + " 'null' must be an integer label in [0, num_classes = " + std::to_string(c.num_classes) + "), got " +
           format::detail::short_json(*null_it));
    c.null.push_back(float(null_it->get<std::int64_t>()));
  } else {
    c.null.push_back(finite_float(*null_it));
  }
  return c;
}

}  // namespace

const std::string* Node::param(const std::string& role) const {
  for (const auto& p : params)
    if (p.role == role) return &p.tensor;
  return nullptr;
}

int Graph::find_value(const std::string& name) const {
  for (std::size_t i = 0; i < values.size(); ++i)
    if (values[i].name == name) return static_cast<int>(i);
  return -1;
}

Graph parse_graph(const json& j, int output_scale) {
  if (!j.is_object()) fail("the graph must be a JSON object");
  for (auto it = j.begin(); it != j.end(); ++it)
    if (it.key() != "inputs" && it.key() != "output" && it.key() != "nodes")
      fail("unknown top-level key '" + it.key() + "' (expected inputs, output, nodes)");
  Graph g;
  std::map<std::string, int> index;

  // Inputs: exactly `sample` (channels, height, width) and `timestep` ({}), and optionally
  // `class_labels` (parse_class_input).
  auto inputs = j.find("inputs");
  if (inputs == j.end() || !inputs->is_object()) fail("'inputs' must be an object with 'sample' and 'timestep'");
  for (auto it = inputs->begin(); it != inputs->end(); ++it)
    if (it.key() != "sample" && it.key() != "timestep" && it.key() != "class_labels")
      fail("unknown input '" + it.key() + "' (the inputs are 'sample', 'timestep' and optionally 'class_labels')");
  auto sample = inputs->find("sample");
  if (sample == inputs->end() || !sample->is_object()) fail("input 'sample' must be declared as {channels, height, width}");
  for (auto it = sample->begin(); it != sample->end(); ++it)
    if (it.key() != "channels" && it.key() != "height" && it.key() != "width")
      fail("input 'sample' has unknown key '" + it.key() + "'");
  auto timestep = inputs->find("timestep");
  if (timestep == inputs->end() || !timestep->is_object() || !timestep->empty())
    fail("input 'timestep' must be declared as an empty object {}");
  const std::string sample_name = "sample";
  Attrs sa(&*sample, sample_name);
  g.in_channels = sa.integer("channels", std::nullopt, 1);
  g.height = sa.integer("height", std::nullopt, 1);
  g.width = sa.integer("width", std::nullopt, 1);
  g.values.push_back({"sample", Kind::Spatial, g.in_channels, 0, 0, -1});
  g.values.push_back({"timestep", Kind::Timestep, 0, 0, 0, -1});
  g.sample = 0;
  g.timestep = 1;
  index["sample"] = 0;
  index["timestep"] = 1;
  if (auto cl = inputs->find("class_labels"); cl != inputs->end()) {
    g.cls = parse_class_input(*cl);
    g.class_labels = int(g.values.size());
    const bool vec = g.cls.kind == ClassKind::Vector;
    g.values.push_back({"class_labels", vec ? Kind::Vector : Kind::Timestep, vec ? g.cls.dim : 0, 0, 0, -1});
    index["class_labels"] = g.class_labels;
  }

  auto nodes = j.find("nodes");
  if (nodes == j.end() || !nodes->is_array() || nodes->empty()) fail("'nodes' must be a non-empty array");
  for (std::size_t ni = 0; ni < nodes->size(); ++ni) {
    const json& nj = (*nodes)[ni];
    const std::string pos = "node #" + std::to_string(ni);
    if (!nj.is_object()) fail(pos + " must be an object");
    for (auto it = nj.begin(); it != nj.end(); ++it)
      if (it.key() != "name" && it.key() != "op" && it.key() != "inputs" && it.key() != "attrs" && it.key() != "params")
        fail(pos + " has unknown key '" + it.key() + "' (expected name, op, inputs, attrs, params)");
    auto name_it = nj.find("name");
    if (name_it == nj.end() || !name_it->is_string() || name_it->get<std::string>().empty())
      fail(pos + " needs a non-empty string 'name'");
    Node n;
    n.name = name_it->get<std::string>();
    if (index.count(n.name)) fail("node name '" + n.name + "' is used twice (names must be unique and differ from the inputs)");
    auto op_it = nj.find("op");
    if (op_it == nj.end() || !op_it->is_string()) fail("node '" + n.name + "' needs a string 'op'");
    const OpSpec* spec = nullptr;
    for (const auto& s : op_specs())
      if (op_it->get<std::string>() == s.name) spec = &s;
    if (!spec) fail("node '" + n.name + "' has unknown op '" + op_it->get<std::string>() + "'");
    n.op = spec->op;

    auto in_it = nj.find("inputs");
    if (in_it == nj.end() || !in_it->is_array()) fail("node '" + n.name + "' needs an 'inputs' array");
    if (int(in_it->size()) < spec->min_inputs || int(in_it->size()) > spec->max_inputs)
      fail("node '" + n.name + "' (" + spec->name + ") takes " + std::to_string(spec->min_inputs) +
           (spec->max_inputs != spec->min_inputs ? " to " + std::to_string(spec->max_inputs) : std::string()) +
           " inputs, got " + std::to_string(in_it->size()));
    for (const auto& e : *in_it) {
      if (!e.is_string()) fail("node '" + n.name + "' inputs must be value names (strings)");
      auto f = index.find(e.get<std::string>());
      if (f == index.end())
        fail("node '" + n.name + "' reads '" + e.get<std::string>() +
             "', which is not an input or an earlier node (nodes must be in topological order)");
      n.inputs.push_back(f->second);
    }

    const json* attrs = nullptr;
    if (auto a = nj.find("attrs"); a != nj.end()) {
      if (!a->is_object()) fail("node '" + n.name + "' attrs must be an object");
      for (auto it = a->begin(); it != a->end(); ++it)
        if (!spec->attrs.count(it.key()))
          fail("node '" + n.name + "' (" + spec->name + ") has unknown attribute '" + it.key() + "'");
      attrs = &*a;
    }
    if (auto p = nj.find("params"); p != nj.end()) {
      if (!p->is_object()) fail("node '" + n.name + "' params must be an object {role: tensor name}");
      for (auto it = p->begin(); it != p->end(); ++it) {
        if (!spec->params.count(it.key()))
          fail("node '" + n.name + "' (" + spec->name + ") has unknown parameter role '" + it.key() + "'");
        if (!it->is_string() || it->get<std::string>().empty())
          fail("node '" + n.name + "' parameter '" + it.key() + "' must name a tensor");
        n.params.push_back({it.key(), it->get<std::string>()});
      }
    }
    for (const auto& r : spec->required_params)
      if (!n.param(r)) fail("node '" + n.name + "' (" + spec->name + ") needs parameter '" + r + "'");

    Attrs a(attrs, n.name);
    switch (n.op) {
      case Op::TimestepEmbedding:
        n.dim = a.integer("dim", std::nullopt, 1);
        n.flip_sin_to_cos = a.boolean("flip_sin_to_cos", false);
        n.freq_shift = a.number("freq_shift", 1.0);
        n.max_period = a.number("max_period", 10000.0);
        n.scale = a.number("scale", 1.0);
        if (n.dim >= 2 && double(n.dim / 2) - n.freq_shift == 0.0)
          fail("node '" + n.name + "': dim/2 - freq_shift must not be 0");
        if (n.max_period <= 0) fail("node '" + n.name + "': max_period must be positive");
        break;
      case Op::Linear: n.out_features = a.integer("out_features", std::nullopt, 1); break;
      case Op::Conv2d: {
        n.out_channels = a.integer("out_channels", std::nullopt, 1);
        auto k = a.ints("kernel", {}, 2, 0, 1);
        n.kernel_h = k[0];
        n.kernel_w = k[1];
        auto s = a.ints("stride", {1, 1}, 2, 0, 1);
        n.stride_h = s[0];
        n.stride_w = s[1];
        auto p = a.ints("padding", {0, 0, 0, 0}, 4, 2, 0);
        if (p.size() == 2) p = {p[0], p[0], p[1], p[1]};  // (ph, pw) -> top, bottom, left, right
        n.pad_t = p[0];
        n.pad_b = p[1];
        n.pad_l = p[2];
        n.pad_r = p[3];
        break;
      }
      case Op::GroupNorm:
        n.groups = a.integer("groups", std::nullopt, 1);
        n.eps = a.number("eps", 1e-5);
        n.silu = a.boolean("silu", false);
        if (n.eps <= 0) fail("node '" + n.name + "': eps must be positive");
        break;
      case Op::Add:
        n.divisor = a.number("divisor", 1.0);
        if (n.divisor == 0) fail("node '" + n.name + "': divisor must not be 0");
        break;
      case Op::Scale:
        n.scale = a.number("scale", 1.0);
        n.shift = a.number("shift", 0.0);
        break;
      case Op::Attention:
        n.heads = a.integer("heads", 1, 1);
        n.inner_dim = a.integer("inner_dim", 0, 0);
        if (a.get("scale")) n.attn_scale = a.number("scale", 0.0);
        n.divisor = a.number("rescale_output_factor", 1.0);
        if (n.divisor == 0) fail("node '" + n.name + "': rescale_output_factor must not be 0");
        break;
      case Op::Embedding:
        n.num_embeddings = a.integer("num_embeddings", std::nullopt, 1);
        n.dim = a.integer("dim", std::nullopt, 1);
        if (n.num_embeddings > (1 << 24)) fail("node '" + n.name + "': num_embeddings must be at most 2^24");
        if (n.inputs[0] != g.class_labels || g.cls.kind != ClassKind::Index)
          fail("node '" + n.name + "' (embedding) must read the input 'class_labels' declared with kind 'index'");
        if (n.num_embeddings != g.cls.num_classes)
          fail("node '" + n.name + "': num_embeddings " + std::to_string(n.num_embeddings) +
               " differs from the input's num_classes " + std::to_string(g.cls.num_classes));
        break;
      case Op::VectorQuantize: n.entries = a.integer("entries", std::nullopt, 1); break;
      default: break;
    }
    n.output = static_cast<int>(g.values.size());
    index[n.name] = n.output;
    g.values.push_back({n.name, Kind::Spatial, 0, 0, 0, static_cast<int>(g.nodes.size())});
    g.nodes.push_back(std::move(n));
  }

  auto out_it = j.find("output");
  if (out_it == j.end() || !out_it->is_string()) fail("'output' must name a value");
  auto f = index.find(out_it->get<std::string>());
  if (f == index.end() || g.values[f->second].producer < 0) fail("output '" + out_it->get<std::string>() + "' is not a node");
  g.output = f->second;
  if (output_scale < 1) fail("the output scale must be at least 1");
  g.output_scale = output_scale;
  infer_shapes(g, g.height, g.width);
  return g;
}

void infer_shapes(Graph& g, int height, int width) {
  const bool declared = height == g.height && width == g.width;
  auto bad = [&](const Node& n, const std::string& msg) -> void {
    std::string text = "node '" + n.name + "' (" + to_string(n.op) + "): " + msg;
    if (declared) fail(text);
    throw Error(ErrorCode::InvalidArgument, format::detail::bounded_message("sample size " + std::to_string(height) + "x" +
                                                                            std::to_string(width) + " does not fit the network: " + text));
  };
  if (height < 1 || width < 1 || height > kMaxSampleSize || width > kMaxSampleSize)
    throw Error(ErrorCode::InvalidArgument, "sample size " + std::to_string(height) + "x" + std::to_string(width) + " is out of range");
  g.values[g.sample] = {"sample", Kind::Spatial, g.in_channels, height, width, -1};
  for (auto& n : g.nodes) {
    auto in = [&](std::size_t i) -> const Value& { return g.values[n.inputs[i]]; };
    Value out = g.values[n.output];
    auto need = [&](std::size_t i, Kind k) {
      if (in(i).kind != k) {
        const char* want = k == Kind::Spatial ? "a spatial (C, H, W)" : k == Kind::Vector ? "a vector (C)" : "the timestep";
        bad(n, "input '" + in(i).name + "' is " + shape_str(in(i)) + ", expected " + want + " value");
      }
    };
    switch (n.op) {
      case Op::TimestepEmbedding:
        need(0, Kind::Timestep);
        out = {n.name, Kind::Vector, n.dim, 0, 0, out.producer};
        break;
      case Op::Linear:
        need(0, Kind::Vector);
        out = {n.name, Kind::Vector, n.out_features, 0, 0, out.producer};
        break;
      case Op::Embedding:
        need(0, Kind::Timestep);
        out = {n.name, Kind::Vector, n.dim, 0, 0, out.producer};
        break;
      case Op::Conv2d: {
        need(0, Kind::Spatial);
        const int hp = in(0).h + n.pad_t + n.pad_b, wp = in(0).w + n.pad_l + n.pad_r;
        if (hp < n.kernel_h || wp < n.kernel_w)
          bad(n, "kernel " + std::to_string(n.kernel_h) + "x" + std::to_string(n.kernel_w) + " is larger than the padded input " +
                     shape_str(in(0)));
        out = {n.name, Kind::Spatial, n.out_channels, (hp - n.kernel_h) / n.stride_h + 1, (wp - n.kernel_w) / n.stride_w + 1,
               out.producer};
        break;
      }
      case Op::GroupNorm:
        need(0, Kind::Spatial);
        if (in(0).c % n.groups != 0)
          bad(n, std::to_string(in(0).c) + " channels are not divisible by " + std::to_string(n.groups) + " groups");
        out = in(0);
        break;
      case Op::Silu:
      case Op::Scale:
        if (in(0).kind == Kind::Timestep) bad(n, "cannot read the raw timestep; use timestep_embedding");
        out = in(0);
        break;
      case Op::Add: {
        const Value &a = in(0), &b = in(1);
        if (a.kind == Kind::Timestep || b.kind == Kind::Timestep) bad(n, "cannot read the raw timestep");
        const bool same = a.kind == b.kind && a.c == b.c && a.h == b.h && a.w == b.w;
        const bool bcast = a.kind == Kind::Spatial && b.kind == Kind::Vector && a.c == b.c;
        if (!same && !bcast)
          bad(n, "cannot add " + shape_str(a) + " and " + shape_str(b) +
                     " (same shapes, or (C, H, W) + (C) broadcast over H, W with the vector second)");
        out = a;
        break;
      }
      case Op::Concat: {
        int c = 0;
        for (std::size_t i = 0; i < n.inputs.size(); ++i) {
          need(i, Kind::Spatial);
          if (in(i).h != in(0).h || in(i).w != in(0).w)
            bad(n, "inputs " + shape_str(in(0)) + " and " + shape_str(in(i)) + " differ in H, W");
          c += in(i).c;
        }
        out = {n.name, Kind::Spatial, c, in(0).h, in(0).w, out.producer};
        break;
      }
      case Op::UpsampleNearest2x:
        need(0, Kind::Spatial);
        out = {n.name, Kind::Spatial, in(0).c, in(0).h * 2, in(0).w * 2, out.producer};
        break;
      case Op::AvgPool2x:
        need(0, Kind::Spatial);
        if (in(0).h % 2 || in(0).w % 2) bad(n, "input " + shape_str(in(0)) + " has an odd H or W");
        out = {n.name, Kind::Spatial, in(0).c, in(0).h / 2, in(0).w / 2, out.producer};
        break;
      case Op::Attention: {
        need(0, Kind::Spatial);
        if (n.inputs.size() == 2) {
          need(1, Kind::Spatial);
          if (in(1).c != in(0).c || in(1).h != in(0).h || in(1).w != in(0).w)
            bad(n, "residual " + shape_str(in(1)) + " differs from the input " + shape_str(in(0)));
        }
        const int d = n.inner_dim ? n.inner_dim : in(0).c;
        if (d % n.heads) bad(n, "inner dim " + std::to_string(d) + " is not divisible by " + std::to_string(n.heads) + " heads");
        out = in(0);
        break;
      }
      case Op::VectorQuantize:
        need(0, Kind::Spatial);
        out = in(0);
        break;
    }
    // Bounds that keep every later size computation far from overflow (a hostile graph could
    // otherwise chain upsamples until int arithmetic wraps).
    if (out.c > (1 << 24) || out.h > (1 << 16) || out.w > (1 << 16) || out.elements() > (std::int64_t(1) << 34))
      bad(n, "output (" + std::to_string(out.c) + ", " + std::to_string(out.h) + ", " + std::to_string(out.w) +
                 ") exceeds the size limits (C <= 2^24, H and W <= 65536, C*H*W <= 2^34)");
    out.name = n.name;
    out.producer = g.values[n.output].producer;
    g.values[n.output] = out;
  }
  const Value& o = g.values[g.output];
  if (o.kind != Kind::Spatial) fail("the output '" + o.name + "' must be a spatial (C, H, W) value");
  if (o.h != height * g.output_scale || o.w != width * g.output_scale) {
    std::string msg = "the output '" + o.name + "' is " + shape_str(o) + ", not the sample's size " + std::to_string(height) +
                      "x" + std::to_string(width) +
                      (g.output_scale > 1 ? " times the decoder's factor " + std::to_string(g.output_scale) : std::string());
    if (declared) fail(msg);
    throw Error(ErrorCode::InvalidArgument, "sample size " + std::to_string(height) + "x" + std::to_string(width) +
                                                " does not fit the network: " + msg);
  }
}

std::vector<ParamRequirement> param_requirements(const Graph& g) {
  std::vector<ParamRequirement> out;
  using S = std::vector<std::int64_t>;
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    const Node& n = g.nodes[i];
    const Value& x = g.values[n.inputs[0]];
    auto add = [&](const char* role, std::vector<S> shapes) {
      if (const std::string* t = n.param(role)) out.push_back({int(i), role, *t, std::move(shapes)});
    };
    switch (n.op) {
      case Op::Linear:
        add("weight", {{n.out_features, x.c}});
        add("bias", {{n.out_features}});
        break;
      case Op::Embedding: add("weight", {{n.num_embeddings, n.dim}}); break;
      case Op::Conv2d:
        add("weight", {{n.out_channels, x.c, n.kernel_h, n.kernel_w}});
        add("bias", {{n.out_channels}});
        break;
      case Op::GroupNorm:
        add("weight", {{x.c}});
        add("bias", {{x.c}});
        break;
      case Op::Attention: {
        const std::int64_t c = x.c, d = n.inner_dim ? n.inner_dim : x.c;
        for (const char* r : {"q_weight", "k_weight", "v_weight"}) add(r, {{d, c}, {d, c, 1, 1}});
        for (const char* r : {"q_bias", "k_bias", "v_bias"}) add(r, {{d}});
        add("out_weight", {{c, d}, {c, d, 1, 1}});
        add("out_bias", {{c}});
        break;
      }
      case Op::VectorQuantize: add("codebook", {{n.entries, x.c}}); break;
      default: break;
    }
  }
  return out;
}

}  // namespace ddim::graph
