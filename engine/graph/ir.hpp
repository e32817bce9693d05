#pragma once
// The network IR: named values, a topologically ordered node list, shapes inferred per batch-free
// sample size. Parsed from the model file's `ddim.graph` JSON (schema: weights/FORMAT.md).
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

namespace ddim::graph {

enum class Op {
  TimestepEmbedding, Linear, Conv2d, GroupNorm, Silu, Add, Scale, Concat, UpsampleNearest2x, AvgPool2x, Attention,
  Embedding,
  VectorQuantize,  // latent decoders (engine/graph/decoder.hpp)
};
const char* to_string(Op) noexcept;

// Batch-free shapes: Timestep is one scalar per sample (the timestep, or an index / scalar class
// label), Vector is (C), Spatial is (C, H, W).
enum class Kind { Timestep, Vector, Spatial };

// The optional graph input `class_labels` (weights/FORMAT.md, format version 2): an integer label
// per sample read by an `embedding` table (Index), a scalar per sample (Scalar: diffusers'
// class_embed_type "timestep"), or a caller-supplied vector of `dim` values (Vector: "identity").
enum class ClassKind { None, Index, Scalar, Vector };
const char* to_string(ClassKind) noexcept;
struct ClassInput {
  ClassKind kind = ClassKind::None;
  int num_classes = 0;      // Index: labels are integers in [0, num_classes)
  int dim = 0;              // Vector: values per sample
  std::vector<float> null;  // the unconditional ("null") input the exporter recorded: 1 value
                            // (Index, Scalar) or dim values (Vector); empty when none was recorded
  int width() const { return kind == ClassKind::None ? 0 : kind == ClassKind::Vector ? dim : 1; }
};

struct Value {
  std::string name;
  Kind kind = Kind::Spatial;
  int c = 0, h = 0, w = 0;  // set by infer_shapes (h = w = 0 for non-spatial)
  int producer = -1;        // node index; -1 for graph inputs
  std::int64_t elements() const { return kind == Kind::Spatial ? std::int64_t(c) * h * w : (kind == Kind::Vector ? c : 1); }
};

// A parameter a node reads: its role ("weight", "bias", "q_weight", ...) and tensor name.
struct Param {
  std::string role;
  std::string tensor;
};

struct Node {
  std::string name;
  Op op = Op::Silu;
  std::vector<int> inputs;  // value indices
  int output = -1;          // value index (a node's output value has the node's name)
  std::vector<Param> params;

  // Attributes (only those of `op` are meaningful; the parser rejects the others).
  int out_features = 0;                    // linear
  int out_channels = 0;                    // conv2d
  int kernel_h = 1, kernel_w = 1;          // conv2d
  int stride_h = 1, stride_w = 1;          // conv2d
  int pad_t = 0, pad_b = 0, pad_l = 0, pad_r = 0;  // conv2d
  int groups = 32;                         // group_norm
  double eps = 1e-5;                       // group_norm
  bool silu = false;                       // group_norm: SiLU fused after the affine
  double divisor = 1.0;                    // add: (a + b) / divisor; attention: rescale_output_factor
  double scale = 1.0, shift = 0.0;         // scale: x * scale + shift; timestep_embedding: scale
  int dim = 0;                             // timestep_embedding
  bool flip_sin_to_cos = false;            // timestep_embedding
  double freq_shift = 1.0;                 // timestep_embedding (diffusers' downscale_freq_shift)
  double max_period = 10000.0;             // timestep_embedding
  int heads = 1;                           // attention
  int inner_dim = 0;                       // attention: d = heads * head_dim (from attrs or = C)
  std::optional<double> attn_scale;        // attention: default 1/sqrt(head_dim)
  int num_embeddings = 0;                  // embedding: rows of the table (dim: its width)
  int entries = 0;                         // vector_quantize: codebook entries (K)

  const std::string* param(const std::string& role) const;  // nullptr when absent
};

struct Graph {
  std::vector<Value> values;
  std::vector<Node> nodes;
  int sample = -1;    // value index of input "sample"
  int timestep = -1;  // value index of input "timestep"
  int class_labels = -1;  // value index of input "class_labels" (-1: an unconditional model)
  ClassInput cls;         // its declaration
  int output = -1;
  int in_channels = 0, height = 0, width = 0;  // declared sample shape
  int output_scale = 1;  // the output is output_scale times the sample's H and W (a decoder's f)

  int find_value(const std::string& name) const;  // -1 when absent
};

// Parses and validates the graph JSON: known ops, known attributes with the right types,
// inputs that name earlier values, unique names, arity per op, declared inputs/output.
// Throws ddim::Error(InvalidFile) naming the node and attribute.
// output_scale: the output's size over the sample's (1 for a U-Net; a latent decoder's
// upsampling factor, engine/graph/decoder.hpp).
Graph parse_graph(const nlohmann::json& j, int output_scale = 1);

// Infers every value's shape for a sample of height x width (the declared size or another the
// architecture admits). Throws ddim::Error naming the node whose inputs do not fit
// (InvalidFile when checking the declared size, InvalidArgument for a caller's size).
void infer_shapes(Graph& g, int height, int width);

// The shape each parameter must have, given inferred shapes: role -> expected shapes (more than
// one when alternatives are accepted, e.g. attention projections as (d, c) or (d, c, 1, 1)).
struct ParamRequirement {
  int node = -1;
  std::string role, tensor;
  std::vector<std::vector<std::int64_t>> shapes;
};
std::vector<ParamRequirement> param_requirements(const Graph& g);

}  // namespace ddim::graph
