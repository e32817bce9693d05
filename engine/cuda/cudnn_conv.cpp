// cuDNN backend (graph API) convolutions with fused epilogues; see cudnn_conv.hpp.
//
// Descriptor life cycle: every backend descriptor is owned by a Desc (cudnnBackendDestroyDescriptor
// in its destructor). A plan keeps every descriptor it was built from (tensors, operations, the
// operation graph, the engine config) alive next to the execution plan.
//
// Failures: building a descriptor that must build (tensors, operations) is checked like every
// cuDNN call (ddim::Error via throw_cudnn: Internal, OutOfMemory, ...). The points where cuDNN
// legitimately says no (the operation graph's finalize, the heuristics' finalize, an engine's or
// engine config's finalize in the engine scan, an execution plan's finalize) are inspected
// instead: a refusal is counted and recorded, and the next candidate is tried. Only when even the bare convolution has no engine does the
// constructor throw ErrorCode::Unsupported, with the reasons.
#include "cuda/cudnn_conv.hpp"

#include <cudnn.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cuda/check.hpp"
#include "cuda/cudnn_loader.hpp"

namespace ddim::cuda {
namespace {

// Unique ids, fixed per role. The virtual (intermediate, fp32) tensors are kUidVirtual + i:
// i = 0 the convolution's output, i = 1, 2 the running sums after the first and second add.
constexpr std::int64_t kUidX = 1, kUidW = 2, kUidY = 3, kUidBias = 4, kUidTemb = 5, kUidResidual = 6;
constexpr std::int64_t kUidVirtual = 100;
// Declared base-pointer alignment of every tensor; run() checks the pointers it is given.
constexpr std::int64_t kAlignment = 16;
// Autotuning: at most this many finalizable configs are timed, each warmed up once and then run
// kTimedRuns times.
constexpr int kMaxAutotuneCandidates = 8;
constexpr int kTimedRuns = 5;
// The engine scan (the last source of configs) finalizes at most this many execution plans: a
// runtime-compiled engine compiles its kernel in the plan's finalize, which can take a second.
constexpr int kMaxScanPlanAttempts = 6;

enum class Add { Bias, Temb, Residual };

const char* add_name(Add a) {
  switch (a) {
    case Add::Bias: return "bias";
    case Add::Temb: return "temb";
    case Add::Residual: return "residual";
  }
  return "?";
}

std::int64_t add_uid(Add a) {
  switch (a) {
    case Add::Bias: return kUidBias;
    case Add::Temb: return kUidTemb;
    case Add::Residual: return kUidResidual;
  }
  return 0;
}

cudnnDataType_t cudnn_type(DType t) {
  switch (t) {
    case DType::F32: return CUDNN_DATA_FLOAT;
    case DType::F16: return CUDNN_DATA_HALF;
    case DType::BF16: return CUDNN_DATA_BFLOAT16;
  }
  throw Error(ErrorCode::Internal, "cudnn_conv: unknown element type");
}

std::string status_text(cudnnStatus_t s) { return cudnn_status_text(s); }

// At the points where cuDNN may legitimately refuse (finalizing a graph, heuristics, an engine,
// an engine config or an execution plan; executing a plan while autotuning): returns when `s` is
// a refusal (check.hpp's Refusal, an unexpected Bug status, or an execution failure without a
// sticky CUDA error), which the caller records before trying the next candidate; throws for
// everything that is not about this convolution: cuDNN unusable here (CudnnEnvironmentError),
// allocation failures (OutOfMemory), a lost device.
void throw_unless_refusal(cudnnStatus_t s, const char* call) {
  switch (classify_cudnn(s)) {
    case CudnnFailure::Environment:
    case CudnnFailure::OutOfMemory: throw_cudnn(s, call, __FILE__, __LINE__);
    case CudnnFailure::Execution:
      if (is_sticky(cudaPeekAtLastError())) throw_cudnn(s, call, __FILE__, __LINE__);
      return;
    case CudnnFailure::Refusal:
    case CudnnFailure::Bug: return;
  }
}

// An owned backend descriptor.
class Desc {
 public:
  Desc() = default;
  explicit Desc(cudnnBackendDescriptorType_t type) { DDIM_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_)); }
  ~Desc() { reset(); }
  Desc(Desc&& o) noexcept : d_(std::exchange(o.d_, nullptr)) {}
  Desc& operator=(Desc&& o) noexcept {
    if (this != &o) {
      reset();
      d_ = std::exchange(o.d_, nullptr);
    }
    return *this;
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }
  // The address of the raw descriptor: the value of a CUDNN_TYPE_BACKEND_DESCRIPTOR attribute.
  const cudnnBackendDescriptor_t* addr() const { return &d_; }

 private:
  void reset() noexcept {
    if (d_) (void)cudnnBackendDestroyDescriptor(d_);  // a destructor cannot report
    d_ = nullptr;
  }
  cudnnBackendDescriptor_t d_ = nullptr;
};

// Checked cudnnBackendSetAttribute / cudnnBackendFinalize naming the attribute or descriptor.
void set_attr(const Desc& d, cudnnBackendAttributeName_t name, const char* name_text, cudnnBackendAttributeType_t type,
              std::int64_t count, const void* values, int line) {
  const cudnnStatus_t s = cudnnBackendSetAttribute(d.get(), name, type, count, values);
  if (s != CUDNN_STATUS_SUCCESS)
    throw_cudnn(s, (std::string("cudnnBackendSetAttribute(") + name_text + ")").c_str(), __FILE__, line);
}
#define DDIM_SET(desc, name, type, count, values) set_attr((desc), (name), #name, (type), (count), (values), __LINE__)

void finalize(const Desc& d, const char* what, int line) {
  const cudnnStatus_t s = cudnnBackendFinalize(d.get());
  if (s != CUDNN_STATUS_SUCCESS) throw_cudnn(s, (std::string("cudnnBackendFinalize(") + what + ")").c_str(), __FILE__, line);
}
#define DDIM_FINALIZE(desc, what) finalize((desc), (what), __LINE__)

using Dims = std::array<std::int64_t, 4>;

// dims {n, c, h, w} (cuDNN's order) of an NHWC (c innermost) packed tensor.
Dims nhwc_strides(const Dims& d) { return {d[2] * d[3] * d[1], 1, d[3] * d[1], d[1]}; }

Desc make_tensor(std::int64_t uid, cudnnDataType_t type, const Dims& dims, const Dims& strides, bool is_virtual) {
  Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  DDIM_SET(t, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type);
  DDIM_SET(t, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data());
  DDIM_SET(t, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data());
  DDIM_SET(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid);
  DDIM_SET(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &kAlignment);
  if (is_virtual) {
    const bool v = true;
    DDIM_SET(t, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
  }
  DDIM_FINALIZE(t, "tensor");
  return t;
}

// An engine config and, when it was made here from an engine (the engine scan), that engine: the
// config references it, so they live and die together. (Configs from the heuristics own their
// engines inside cuDNN.)
struct EngineConfig {
  Desc config;
  Desc engine;
};

// One operation graph: the descriptors it is made of and the finalized graph (or why not).
struct OpGraph {
  std::vector<Desc> parts;          // tensors, the convolution descriptor, pointwise descriptors, operations
  Desc graph;                       // finalized when `refused` is empty
  std::string refused;              // why cuDNN did not finalize the graph
};

// conv -> ADD adds[0] -> ... -> ADD adds[count - 1]; the last operation writes y (uid kUidY, the
// activation type), every earlier result is a virtual fp32 tensor.
OpGraph build_graph(cudnnHandle_t handle, const ConvShape& s, DType t, const std::vector<Add>& adds, int count) {
  OpGraph g;
  // References into `parts` are taken while it grows: reserve every slot first (5 descriptors
  // for the convolution, 4 per add), so that it never reallocates.
  g.parts.reserve(5 + 4 * static_cast<std::size_t>(count));
  const cudnnDataType_t io = cudnn_type(t);
  const std::int64_t n = s.n, c = s.cin, k = s.cout, oh = s.out_h(), ow = s.out_w();
  const Dims x_dims{n, c, s.h, s.w}, w_dims{k, c, s.kh, s.kw}, y_dims{n, k, oh, ow};
  const Dims bias_dims{1, k, 1, 1}, temb_dims{n, k, 1, 1}, vec_strides{k, 1, k, k};

  g.parts.push_back(make_tensor(kUidX, io, x_dims, nhwc_strides(x_dims), false));
  const Desc& x = g.parts.back();
  g.parts.push_back(make_tensor(kUidW, io, w_dims, nhwc_strides(w_dims), false));  // KRSC
  const Desc& w = g.parts.back();
  // The convolution's output: y itself, or the first virtual tensor.
  if (count == 0) g.parts.push_back(make_tensor(kUidY, io, y_dims, nhwc_strides(y_dims), false));
  else g.parts.push_back(make_tensor(kUidVirtual, CUDNN_DATA_FLOAT, y_dims, nhwc_strides(y_dims), true));
  const Desc* current = &g.parts.back();

  Desc conv(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
  const cudnnDataType_t compute = CUDNN_DATA_FLOAT;
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  const std::int64_t spatial = 2;
  const std::int64_t pre[2] = {s.pad_t, s.pad_l}, post[2] = {s.pad_b, s.pad_r};
  const std::int64_t strides[2] = {s.stride_h, s.stride_w}, dilations[2] = {1, 1};
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &compute);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &spatial);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, 2, pre);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, 2, post);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, 2, strides);
  DDIM_SET(conv, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, 2, dilations);
  DDIM_FINALIZE(conv, "convolution");
  g.parts.push_back(std::move(conv));
  const Desc& conv_desc = g.parts.back();

  std::vector<cudnnBackendDescriptor_t> ops;
  {
    Desc op(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR);
    const float alpha = 1.f, beta = 0.f;
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, x.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, w.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, current->addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, conv_desc.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, 1, &alpha);
    DDIM_SET(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, 1, &beta);
    DDIM_FINALIZE(op, "convolution forward operation");
    ops.push_back(op.get());
    g.parts.push_back(std::move(op));
  }

  for (int i = 0; i < count; ++i) {
    const Add a = adds[static_cast<std::size_t>(i)];
    // The addend: bias fp32 (1, k, 1, 1); temb (n, k, 1, 1) and residual (n, k, oh, ow) of the
    // activation type.
    if (a == Add::Bias) g.parts.push_back(make_tensor(kUidBias, CUDNN_DATA_FLOAT, bias_dims, vec_strides, false));
    else if (a == Add::Temb) g.parts.push_back(make_tensor(kUidTemb, io, temb_dims, vec_strides, false));
    else g.parts.push_back(make_tensor(kUidResidual, io, y_dims, nhwc_strides(y_dims), false));
    const Desc& addend = g.parts.back();
    const bool last = i + 1 == count;
    if (last) g.parts.push_back(make_tensor(kUidY, io, y_dims, nhwc_strides(y_dims), false));
    else g.parts.push_back(make_tensor(kUidVirtual + i + 1, CUDNN_DATA_FLOAT, y_dims, nhwc_strides(y_dims), true));
    const Desc& out = g.parts.back();

    Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    const cudnnPointwiseMode_t pw_mode = CUDNN_POINTWISE_ADD;
    const cudnnDataType_t prec = CUDNN_DATA_FLOAT;
    DDIM_SET(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &pw_mode);
    DDIM_SET(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, 1, &prec);
    DDIM_FINALIZE(pw, "pointwise add");
    g.parts.push_back(std::move(pw));
    const Desc& pw_desc = g.parts.back();

    Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    const float one = 1.f;
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, pw_desc.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, current->addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, addend.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, out.addr());
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1, &one);
    DDIM_SET(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1, &one);
    DDIM_FINALIZE(op, "pointwise add operation");
    ops.push_back(op.get());
    g.parts.push_back(std::move(op));
    current = &out;
  }

  g.graph = Desc(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  DDIM_SET(g.graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<std::int64_t>(ops.size()),
           ops.data());
  // The handle names the device the graph is planned for. The attribute is marked deprecated in
  // cuDNN 9.19's header (cudnn-frontend treats it as optional from 9.8 on and still sets it): a
  // library that no longer accepts it is not an error here.
  (void)cudnnBackendSetAttribute(g.graph.get(), CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
  const cudnnStatus_t st = cudnnBackendFinalize(g.graph.get());
  if (st != CUDNN_STATUS_SUCCESS) {
    throw_unless_refusal(st, "cudnnBackendFinalize(operation graph)");
    g.refused = "operation graph not finalized: " + status_text(st);
  }
  return g;
}

// The engine configs heuristics `mode` proposes for a finalized graph, best first (empty, with
// `why`, when the heuristics have none).
std::vector<EngineConfig> heuristic_configs(const Desc& graph, cudnnBackendHeurMode_t mode, std::string& why) {
  Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  DDIM_SET(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, graph.addr());
  DDIM_SET(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode);
  const cudnnStatus_t st = cudnnBackendFinalize(heur.get());
  if (st != CUDNN_STATUS_SUCCESS) {
    throw_unless_refusal(st, "cudnnBackendFinalize(engine heuristics)");
    why = "heuristics not finalized: " + status_text(st);
    return {};
  }
  std::int64_t count = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0,
                                            &count, nullptr));
  std::vector<EngineConfig> configs;
  if (count <= 0) {
    why = "the heuristics proposed no engine config";
    return configs;
  }
  std::vector<cudnnBackendDescriptor_t> raw;
  for (std::int64_t i = 0; i < count; ++i) {
    configs.push_back(EngineConfig{Desc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR), Desc()});
    raw.push_back(configs.back().config.get());
  }
  std::int64_t got = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
                                            count, &got, raw.data()));
  configs.resize(static_cast<std::size_t>(std::clamp<std::int64_t>(got, 0, count)));
  if (configs.empty()) why = "the heuristics proposed no engine config";
  return configs;
}

// Every engine of the graph by global index, each with its default knobs: the last resort when
// neither heuristics mode proposes a config that builds (the engines' own finalize filters the
// ones that do not support the graph).
std::vector<EngineConfig> scan_configs(const Desc& graph, std::string& why) {
  std::int64_t count = 0, n = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(graph.get(), CUDNN_ATTR_OPERATIONGRAPH_ENGINE_GLOBAL_COUNT, CUDNN_TYPE_INT64,
                                            1, &n, &count));
  std::vector<EngineConfig> configs;
  int refused = 0;
  std::string first;
  for (std::int64_t i = 0; i < count; ++i) {
    Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
    DDIM_SET(engine, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, graph.addr());
    DDIM_SET(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &i);
    cudnnStatus_t st = cudnnBackendFinalize(engine.get());
    Desc config;
    if (st == CUDNN_STATUS_SUCCESS) {
      config = Desc(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
      DDIM_SET(config, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, engine.addr());
      st = cudnnBackendFinalize(config.get());
    }
    if (st != CUDNN_STATUS_SUCCESS) {
      throw_unless_refusal(st, "cudnnBackendFinalize(engine)");
      if (refused++ == 0) first = "engine " + std::to_string(i) + ": " + status_text(st);
      continue;
    }
    configs.push_back(EngineConfig{std::move(config), std::move(engine)});
  }
  if (configs.empty())
    why = std::to_string(count) + " engines, none supports the graph" + (first.empty() ? "" : " (" + first + ")");
  return configs;
}

// What the engine of a config is: its global index, and its notes as text. `numerics_refusal`
// says why its numerics are not acceptable for `t` (empty when they are): reduced-precision
// (non-fp32) reductions, non-determinism and FFT / Winograd transforms always; for fp32 also
// tensor cores and down-converted inputs (TF32). (fp16 / bf16 engines may down-convert the fp32
// bias to the activation type: one more rounding of a term the error bound already counts.)
struct EngineInfo {
  std::int64_t index = -1;
  std::string notes;
  std::string numerics_refusal;
};

EngineInfo engine_info(const Desc& config, DType t) {
  EngineInfo info;
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  cudnnBackendDescriptor_t raw = engine.get();
  std::int64_t n = 0;
  DDIM_CUDNN_CHECK(
      cudnnBackendGetAttribute(config.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &raw));
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n,
                                            &info.index));
  // Room for more notes than this header knows (a newer library may add some).
  std::array<cudnnBackendNumericalNote_t, 32> numerical{};
  std::int64_t numerical_count = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                                            static_cast<std::int64_t>(numerical.size()), &numerical_count,
                                            numerical.data()));
  std::array<cudnnBackendBehaviorNote_t, 32> behavior{};
  std::int64_t behavior_count = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(engine.get(), CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE, CUDNN_TYPE_BEHAVIOR_NOTE,
                                            static_cast<std::int64_t>(behavior.size()), &behavior_count,
                                            behavior.data()));
  auto note = [&info](const char* text) { info.notes += (info.notes.empty() ? "" : ", ") + std::string(text); };
  auto refuse = [&info](const char* text) {
    info.numerics_refusal += (info.numerics_refusal.empty() ? "" : ", ") + std::string(text);
  };
  const auto nn = static_cast<std::size_t>(std::clamp<std::int64_t>(numerical_count, 0, std::int64_t(numerical.size())));
  for (std::size_t i = 0; i < nn; ++i) {
    switch (numerical[i]) {
      case CUDNN_NUMERICAL_NOTE_TENSOR_CORE:
        note("tensor cores");
        if (t == DType::F32) refuse("tensor cores (TF32)");
        break;
      case CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS:
        note("down-converted inputs");
        if (t == DType::F32) refuse("down-converted inputs");
        break;
      case CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION: refuse("reduced-precision reduction"); break;
      case CUDNN_NUMERICAL_NOTE_FFT: refuse("FFT"); break;
      case CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC: refuse("non-deterministic"); break;
      case CUDNN_NUMERICAL_NOTE_WINOGRAD:
      case CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_4x4:
      case CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_6x6:
      case CUDNN_NUMERICAL_NOTE_WINOGRAD_TILE_13x13: refuse("Winograd"); break;
      default: break;
    }
  }
  const auto bn = static_cast<std::size_t>(std::clamp<std::int64_t>(behavior_count, 0, std::int64_t(behavior.size())));
  for (std::size_t i = 0; i < bn; ++i)
    if (behavior[i] == CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION) note("runtime compiled");
  return info;
}

// A finalized execution plan and what it came from.
struct Candidate {
  EngineConfig config;
  Desc plan;
  EngineInfo engine;
  std::size_t workspace = 0;
  int position = 0;  // 1-based, in the heuristics' list
  float ms = -1.f;   // autotuned time per run
};

// The execution plan of one engine config, or nothing (with `why`) when cuDNN refuses it.
std::optional<Candidate> make_plan(cudnnHandle_t handle, EngineConfig config, std::string& why) {
  Candidate c;
  c.plan = Desc(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  DDIM_SET(c.plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, config.config.addr());
  // The plan's handle: marked deprecated in cuDNN 9.19's header; current cudnn-frontend builds
  // plans without it (the engine config carries the graph and its device). Set when accepted, a
  // refusal is not an error.
  (void)cudnnBackendSetAttribute(c.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle);
  const cudnnStatus_t st = cudnnBackendFinalize(c.plan.get());
  if (st != CUDNN_STATUS_SUCCESS) {
    throw_unless_refusal(st, "cudnnBackendFinalize(execution plan)");
    why = status_text(st);
    return std::nullopt;
  }
  std::int64_t workspace = 0, n = 0;
  DDIM_CUDNN_CHECK(cudnnBackendGetAttribute(c.plan.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                            &n, &workspace));
  if (workspace < 0) throw Error(ErrorCode::Internal, "cudnn: negative workspace size of an execution plan");
  c.workspace = static_cast<std::size_t>(workspace);
  c.config = std::move(config);
  return c;
}

// A variant pack: the data pointers by unique id, and the workspace.
Desc variant_pack(const std::int64_t* uids, void* const* pointers, int count, void* workspace) {
  Desc vp(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  DDIM_SET(vp, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, count, uids);
  DDIM_SET(vp, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, count, pointers);
  DDIM_SET(vp, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace);
  DDIM_FINALIZE(vp, "variant pack");
  return vp;
}

// The pointers of the non-virtual tensors of a graph with the first `fused` adds, in uid order
// of `uids`; returns the count.
struct Binding {
  std::array<std::int64_t, 6> uids{};
  std::array<void*, 6> pointers{};
  int count = 0;
  void add(std::int64_t uid, const void* p) {
    uids[static_cast<std::size_t>(count)] = uid;
    pointers[static_cast<std::size_t>(count)] = const_cast<void*>(p);  // cuDNN takes void* for inputs too
    ++count;
  }
};

Binding bind(const std::vector<Add>& adds, int fused, const void* x, const void* w, const float* bias, const void* temb,
             const void* residual, void* y) {
  Binding b;
  b.add(kUidX, x);
  b.add(kUidW, w);
  b.add(kUidY, y);
  for (int i = 0; i < fused; ++i) {
    const Add a = adds[static_cast<std::size_t>(i)];
    b.add(add_uid(a), a == Add::Bias ? static_cast<const void*>(bias) : a == Add::Temb ? temb : residual);
  }
  return b;
}

// Temporary device memory for autotuning, filled with a constant non-zero pattern (finite in
// every element type: 0x3C3C is 1.06 in fp16, 0.0115 in bf16; 0x3C3C3C3C is 0.0115 in fp32) on the
// stream the timed runs use, so they read it in order (no device-wide synchronisation: that
// would invalidate another thread's stream capture).
class Scratch {
 public:
  Scratch(std::size_t bytes, cudaStream_t stream) {
    bytes = std::max<std::size_t>(bytes, 256);
    DDIM_CUDA_CHECK(cudaMalloc(&p_, bytes));
    const cudaError_t e = cudaMemsetAsync(p_, 0x3C, bytes, stream);
    if (e != cudaSuccess) {
      (void)cudaFree(p_);  // a throwing constructor runs no destructor
      p_ = nullptr;
      throw_cuda(e, "cudaMemsetAsync of the autotuning scratch", __FILE__, __LINE__);
    }
  }
  ~Scratch() {
    if (p_) (void)cudaFree(p_);
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return p_; }

 private:
  void* p_ = nullptr;
};

class Event {
 public:
  Event() { DDIM_CUDA_CHECK(cudaEventCreate(&e_)); }
  ~Event() {
    if (e_) (void)cudaEventDestroy(e_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

std::string bytes_text(std::size_t b) {
  if (b >= (std::size_t(1) << 20)) return std::to_string((b + (std::size_t(1) << 19)) >> 20) + " MiB";
  if (b >= 1024) return std::to_string((b + 512) >> 10) + " KiB";
  return std::to_string(b) + " B";
}

std::string join_adds(const std::vector<Add>& adds, int from, int to) {
  std::string s;
  for (int i = from; i < to; ++i) s += (s.empty() ? "" : "+") + std::string(add_name(adds[static_cast<std::size_t>(i)]));
  return s;
}

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(kAlignment) == 0; }

}  // namespace

// ------------------------------------------------------------------------------------------------

std::string describe(const ConvShape& s, DType t, const ConvEpilogue& e) {
  std::string d = "conv " + std::to_string(s.kh) + "x" + std::to_string(s.kw) + " n" + std::to_string(s.n) + " " +
                  std::to_string(s.h) + "x" + std::to_string(s.w) + "x" + std::to_string(s.cin) + " -> " +
                  std::to_string(s.out_h()) + "x" + std::to_string(s.out_w()) + "x" + std::to_string(s.cout) +
                  " stride " + std::to_string(s.stride_h) + "x" + std::to_string(s.stride_w) + " pad t" +
                  std::to_string(s.pad_t) + " b" + std::to_string(s.pad_b) + " l" + std::to_string(s.pad_l) + " r" +
                  std::to_string(s.pad_r) + " " + to_string(t);
  if (e.bias) d += " + bias";
  if (e.time_add) d += " + temb";
  if (e.residual_add) d += " + residual";
  return d;
}

CudnnHandle::CudnnHandle() {
  preload_cudnn_sublibraries();
  DDIM_CUDNN_CHECK(cudnnCreate(&handle_));
}
CudnnHandle::~CudnnHandle() {
  if (handle_) (void)cudnnDestroy(handle_);
}

struct CudnnConv::Impl {
  ConvShape shape{};
  DType dtype = DType::F32;
  ConvEpilogue epilogue;
  std::string what;         // describe(...)
  std::vector<Add> adds;    // the epilogue's adds, in order
  int fused = 0;            // adds[0, fused) run inside the plan
  OpGraph graph;            // what the plan was built from (kept alive with it)
  Candidate chosen;
  std::string description;

  void build(cudnnHandle_t handle, bool autotune);
  bool select(cudnnHandle_t handle, const OpGraph& g, int fused_adds, bool autotune, std::string& why);
  void time_candidates(cudnnHandle_t handle, std::vector<Candidate>& candidates, int fused_adds, std::string& why);
};

// Tries the engine configs of heuristics mode A, then of mode FALLBACK, for one graph; true when
// one became `chosen`.
bool CudnnConv::Impl::select(cudnnHandle_t handle, const OpGraph& g, int fused_adds, bool autotune, std::string& why) {
  // The sources of engine configs, in order: heuristics mode A, mode FALLBACK, then every engine
  // by global index.
  const char* const sources[] = {"heuristics mode A", "heuristics mode fallback", "engine scan"};
  for (int source = 0; source < 3; ++source) {
    const char* source_name = sources[source];
    std::string heur_why;
    std::vector<EngineConfig> configs = source == 0   ? heuristic_configs(g.graph, CUDNN_HEUR_MODE_A, heur_why)
                                : source == 1 ? heuristic_configs(g.graph, CUDNN_HEUR_MODE_FALLBACK, heur_why)
                                              : scan_configs(g.graph, heur_why);
    if (configs.empty()) {
      why += std::string(why.empty() ? "" : "; ") + source_name + ": " + heur_why;
      continue;
    }
    const int total = static_cast<int>(configs.size());
    int refused_numerics = 0, refused_finalize = 0;
    std::string first_numerics, first_finalize;
    std::vector<Candidate> finalized;
    int plan_attempts = 0;
    for (int i = 0; i < total; ++i) {
      EngineConfig& config = configs[static_cast<std::size_t>(i)];
      EngineInfo info;
      try {
        info = engine_info(config.config, dtype);
      } catch (const CudnnEnvironmentError&) {
        throw;
      } catch (const Error& e) {
        if (e.code() == ErrorCode::OutOfMemory || e.code() == ErrorCode::DeviceLost) throw;
        ++refused_finalize;  // an engine we cannot inspect is not used
        if (first_finalize.empty()) first_finalize = std::string("engine query failed: ") + e.what();
        continue;
      }
      if (!info.numerics_refusal.empty()) {
        ++refused_numerics;
        if (first_numerics.empty())
          first_numerics = "engine " + std::to_string(info.index) + ": " + info.numerics_refusal;
        continue;
      }
      if (source == 2 && plan_attempts >= kMaxScanPlanAttempts) break;
      ++plan_attempts;
      std::string plan_why;
      std::optional<Candidate> c = make_plan(handle, std::move(config), plan_why);
      if (!c) {
        ++refused_finalize;
        if (first_finalize.empty()) first_finalize = "engine " + std::to_string(info.index) + ": " + plan_why;
        continue;
      }
      c->engine = std::move(info);
      c->position = i + 1;
      finalized.push_back(std::move(*c));
      if (!autotune || static_cast<int>(finalized.size()) >= kMaxAutotuneCandidates) break;
    }
    std::string summary = std::string(source_name) + ": " + std::to_string(total) + " configs";
    if (refused_numerics) summary += ", " + std::to_string(refused_numerics) + " refused for numerics (" + first_numerics + ")";
    if (refused_finalize) summary += ", " + std::to_string(refused_finalize) + " not finalized (" + first_finalize + ")";
    if (finalized.empty()) {
      why += (why.empty() ? "" : "; ") + summary;
      continue;
    }
    std::string tune_note;
    if (autotune && finalized.size() > 1) time_candidates(handle, finalized, fused_adds, tune_note);
    // time_candidates sorts the fastest first and drops configs that failed to run.
    if (finalized.empty()) {
      why += (why.empty() ? "" : "; ") + summary + ", " + tune_note;
      continue;
    }
    chosen = std::move(finalized.front());
    const int count = static_cast<int>(adds.size());
    description = "engine " + std::to_string(chosen.engine.index) + " (";
    if (fused_adds == count && count > 0) description += "fused conv+" + join_adds(adds, 0, count);
    else if (fused_adds == 0) description += "conv";
    else description += "conv+" + join_adds(adds, 0, fused_adds);
    if (fused_adds < count) description += ", " + join_adds(adds, fused_adds, count) + " by the epilogue kernel";
    if (!chosen.engine.notes.empty()) description += "; " + chosen.engine.notes;
    description += "; " + std::string(source_name) + ", config " + std::to_string(chosen.position) + " of " +
                   std::to_string(total);
    if (refused_numerics || refused_finalize) {
      // The first refusal, shortened: what an unexpected choice is most likely explained by.
      std::string first = !first_numerics.empty() ? first_numerics : first_finalize;
      if (first.size() > 120) first = first.substr(0, 120) + "...";
      description += " (" + std::to_string(refused_numerics + refused_finalize) + " refused before it, e.g. " + first + ")";
    }
    if (chosen.ms >= 0.f) {
      char tuned[64];
      std::snprintf(tuned, sizeof tuned, "; autotuned %.1f us per run", double(chosen.ms) * 1000.0);
      description += tuned;
    }
    description += "; workspace " + bytes_text(chosen.workspace) + ")";
    return true;
  }
  return false;
}

// Times each candidate on scratch buffers (the handle's current stream) and orders them fastest
// first; a candidate whose execution fails is dropped (`why` says so).
void CudnnConv::Impl::time_candidates(cudnnHandle_t handle, std::vector<Candidate>& candidates, int fused_adds,
                                      std::string& why) {
  const ConvShape& s = shape;
  const std::size_t e = dtype_size(dtype);
  const std::size_t x_bytes = std::size_t(s.n) * s.h * s.w * s.cin * e;
  const std::size_t w_bytes = std::size_t(s.cout) * s.kh * s.kw * s.cin * e;
  const std::size_t y_bytes = std::size_t(s.n) * s.out_h() * s.out_w() * s.cout * e;
  std::size_t workspace = 0;
  for (const Candidate& c : candidates) workspace = std::max(workspace, c.workspace);
  cudaStream_t stream = nullptr;
  DDIM_CUDNN_CHECK(cudnnGetStream(handle, &stream));
  Scratch x(x_bytes, stream), w(w_bytes, stream), y(y_bytes, stream), residual(y_bytes, stream),
      bias(std::size_t(s.cout) * 4, stream), temb(std::size_t(s.n) * s.cout * e, stream), ws(workspace, stream);
  const Binding b = bind(adds, fused_adds, x.get(), w.get(), static_cast<const float*>(bias.get()), temb.get(),
                         residual.get(), y.get());
  const Desc vp = variant_pack(b.uids.data(), b.pointers.data(), b.count, ws.get());
  Event start, stop;
  int dropped = 0;
  for (Candidate& c : candidates) {
    cudnnStatus_t st = cudnnBackendExecute(handle, c.plan.get(), vp.get());  // warm-up
    if (st == CUDNN_STATUS_SUCCESS) {
      DDIM_CUDA_CHECK(cudaEventRecord(start.get(), stream));
      for (int r = 0; r < kTimedRuns && st == CUDNN_STATUS_SUCCESS; ++r) st = cudnnBackendExecute(handle, c.plan.get(), vp.get());
      DDIM_CUDA_CHECK(cudaEventRecord(stop.get(), stream));
    }
    DDIM_CUDA_CHECK(cudaStreamSynchronize(stream));  // a device fault surfaces here (DeviceLost)
    if (st != CUDNN_STATUS_SUCCESS) {
      throw_unless_refusal(st, "cudnnBackendExecute (autotuning)");
      ++dropped;
      if (why.empty()) why = "engine " + std::to_string(c.engine.index) + " failed to run: " + status_text(st);
      c.ms = std::numeric_limits<float>::infinity();
      continue;
    }
    float ms = 0.f;
    DDIM_CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    c.ms = ms / kTimedRuns;
  }
  std::stable_sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b2) { return a.ms < b2.ms; });
  while (!candidates.empty() && !(candidates.back().ms < std::numeric_limits<float>::infinity())) candidates.pop_back();
  if (dropped) why = std::to_string(dropped) + " dropped when autotuning (" + why + ")";
}

void CudnnConv::Impl::build(cudnnHandle_t handle, bool autotune) {
  if (epilogue.bias) adds.push_back(Add::Bias);
  if (epilogue.time_add) adds.push_back(Add::Temb);
  if (epilogue.residual_add) adds.push_back(Add::Residual);
  const int count = static_cast<int>(adds.size());
  std::string reasons;
  // The whole epilogue first, then shorter prefixes of it, down to the bare convolution.
  for (int f = count; f >= 0; --f) {
    std::string why;
    try {
      OpGraph g = build_graph(handle, shape, dtype, adds, f);
      if (!g.refused.empty()) why = g.refused;
      else if (select(handle, g, f, autotune, why)) {
        fused = f;
        graph = std::move(g);
        if (f < count && !reasons.empty()) {
          std::string r = reasons.size() > 300 ? reasons.substr(0, 300) + "..." : reasons;
          description += " [not fused: " + r + "]";
        }
        return;
      }
    } catch (const CudnnEnvironmentError&) {
      throw;
    } catch (const Error& e) {
      // A fused graph cuDNN does not even let us build is one more refusal; the bare
      // convolution must build (a failure there is reported as it is).
      if (f == 0 || e.code() == ErrorCode::OutOfMemory || e.code() == ErrorCode::DeviceLost) throw;
      why = e.what();
    }
    const std::string level = f == 0 ? "conv" : "conv+" + join_adds(adds, 0, f);
    reasons += (reasons.empty() ? "" : " | ") + level + ": " + why;
  }
  // A refusal caused by a device fault (e.g. while loading a runtime-compiled kernel) is not
  // "unsupported".
  const cudaError_t e = cudaPeekAtLastError();
  if (e != cudaSuccess && is_sticky(e)) throw_cuda(e, "cuDNN plan building", __FILE__, __LINE__);
  if (reasons.size() > 1500) reasons = reasons.substr(0, 1500) + "...";
  throw Error(ErrorCode::Unsupported, "cudnn: no engine for this convolution: " + reasons);
}

CudnnConv::CudnnConv(cudnnHandle_t handle, const ConvShape& shape, DType dtype, const ConvEpilogue& epilogue,
                     bool autotune)
    : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.shape = shape;
  m.dtype = dtype;
  m.epilogue = epilogue;
  m.what = describe(shape, dtype, epilogue);
  const ConvShape& s = shape;
  if (!handle) throw Error(ErrorCode::InvalidArgument, m.what + ": no cuDNN handle");
  if (s.n < 1 || s.h < 1 || s.w < 1 || s.cin < 1 || s.cout < 1 || s.kh < 1 || s.kw < 1 || s.stride_h < 1 ||
      s.stride_w < 1 || s.pad_t < 0 || s.pad_b < 0 || s.pad_l < 0 || s.pad_r < 0 || s.h + s.pad_t + s.pad_b < s.kh ||
      s.w + s.pad_l + s.pad_r < s.kw)
    throw Error(ErrorCode::InvalidArgument, m.what + ": not a valid convolution shape");
  // The epilogue kernel indexes with int dimensions and size_t offsets; keep every tensor's
  // element count well inside int64 and its dimensions inside int.
  const std::int64_t y_hw = std::int64_t(s.out_h()) * s.out_w();
  if (y_hw > std::numeric_limits<int>::max())
    throw Error(ErrorCode::InvalidArgument, m.what + ": output too large");
  try {
    m.build(handle, autotune);
  } catch (const CudnnEnvironmentError& e) {
    throw CudnnEnvironmentError(m.what + ": " + e.what());
  } catch (const Error& e) {
    throw Error(e.code(), m.what + ": " + e.what());
  }
}

CudnnConv::~CudnnConv() = default;

void CudnnConv::run(cudnnHandle_t handle, const void* x, const void* w, const float* bias, const void* temb,
                    const void* residual, void* y, void* workspace, cudaStream_t stream) const {
  const Impl& m = *impl_;
  auto invalid = [&m](const std::string& why) { throw Error(ErrorCode::InvalidArgument, m.what + ": " + why); };
  if (!handle) invalid("no cuDNN handle");
  if (!x || !w || !y) invalid("null x, w or y");
  if (m.epilogue.bias && !bias) invalid("null bias");
  if (m.epilogue.time_add && !temb) invalid("null time embedding");
  if (m.epilogue.residual_add && !residual) invalid("null residual");
  if (!m.epilogue.bias) bias = nullptr;
  if (!m.epilogue.time_add) temb = nullptr;
  if (!m.epilogue.residual_add) residual = nullptr;
  for (const void* p : {x, w, static_cast<const void*>(y), static_cast<const void*>(bias), temb, residual})
    if (p && !aligned(p)) invalid("a tensor pointer is not " + std::to_string(kAlignment) + "-byte aligned");
  if (y == x || (temb && y == temb) || (residual && y == residual)) invalid("y must not be an input");
  if (m.chosen.workspace > 0 && !workspace)
    invalid("no workspace (the plan needs " + std::to_string(m.chosen.workspace) + " bytes)");
  try {
    DDIM_CUDNN_CHECK(cudnnSetStream(handle, stream));
    const Binding b = bind(m.adds, m.fused, x, w, bias, temb, residual, y);
    const Desc vp = variant_pack(b.uids.data(), b.pointers.data(), b.count, workspace);
    DDIM_CUDNN_CHECK(cudnnBackendExecute(handle, m.chosen.plan.get(), vp.get()));
  } catch (const Error& e) {
    throw Error(e.code(), m.what + ": " + e.what());
  }
  if (m.fused < static_cast<int>(m.adds.size())) {
    const float* rest_bias = nullptr;
    const void* rest_temb = nullptr;
    const void* rest_residual = nullptr;
    for (std::size_t i = static_cast<std::size_t>(m.fused); i < m.adds.size(); ++i) {
      if (m.adds[i] == Add::Bias) rest_bias = bias;
      else if (m.adds[i] == Add::Temb) rest_temb = temb;
      else rest_residual = residual;
    }
    const ConvShape& s = m.shape;
    conv_epilogue(y, m.dtype, s.n, s.out_h() * s.out_w(), s.cout, rest_bias, rest_temb, rest_residual, stream);
  }
}

std::size_t CudnnConv::workspace_bytes() const noexcept { return impl_->chosen.workspace; }
bool CudnnConv::fused() const noexcept { return impl_->fused == static_cast<int>(impl_->adds.size()); }
int CudnnConv::fused_adds() const noexcept { return impl_->fused; }
const std::string& CudnnConv::engine_description() const noexcept { return impl_->description; }
const ConvShape& CudnnConv::shape() const noexcept { return impl_->shape; }
DType CudnnConv::dtype() const noexcept { return impl_->dtype; }
const ConvEpilogue& CudnnConv::epilogue() const noexcept { return impl_->epilogue; }

// ------------------------------------------------------------------------------------------------

ConvPlanCache::ConvPlanCache(int device) : device_(device) {
  preload_cudnn_sublibraries();
  DDIM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  const cudnnStatus_t s = cudnnCreate(&handle_);
  if (s != CUDNN_STATUS_SUCCESS) {
    handle_ = nullptr;
    (void)cudaStreamDestroy(stream_);
    throw_cudnn(s, "cudnnCreate (the convolution plan cache)", __FILE__, __LINE__);
  }
  const cudnnStatus_t t = cudnnSetStream(handle_, stream_);
  if (t != CUDNN_STATUS_SUCCESS) {
    (void)cudnnDestroy(handle_);
    (void)cudaStreamDestroy(stream_);
    throw_cudnn(t, "cudnnSetStream (the convolution plan cache)", __FILE__, __LINE__);
  }
}

ConvPlanCache::~ConvPlanCache() {
  plans_.clear();  // the plans before their handle
  if (handle_) (void)cudnnDestroy(handle_);
  if (stream_) (void)cudaStreamDestroy(stream_);
}

std::shared_ptr<ConvPlanCache> ConvPlanCache::for_device(int device) {
  const char* env = std::getenv("DDIM_CUDNN_PLAN_CACHE");
  if (env && std::string(env) == "0") return std::make_shared<ConvPlanCache>(device);
  static std::mutex mutex;
  // Never destroyed: cuDNN handles must not be torn down after the CUDA runtime at process exit.
  static auto* caches = new std::map<int, std::shared_ptr<ConvPlanCache>>();
  const std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<ConvPlanCache>& slot = (*caches)[device];
  if (!slot) {
    slot = std::make_shared<ConvPlanCache>(device);
    slot->shared_ = true;
  }
  return slot;
}

ConvPlanCache::Key ConvPlanCache::key_of(const ConvShape& s, DType t, const ConvEpilogue& e, bool autotune) {
  return Key{s.n,     s.h,     s.w,     s.cin,   s.cout,         s.kh,   s.kw,           s.stride_h, s.stride_w,
             s.pad_t, s.pad_b, s.pad_l, s.pad_r, static_cast<int>(t), e.bias, e.time_add, e.residual_add, autotune};
}

std::shared_ptr<const CudnnConv> ConvPlanCache::get(const ConvShape& shape, DType dtype, const ConvEpilogue& epilogue,
                                                    bool autotune) {
  const Key key = key_of(shape, dtype, epilogue, autotune);
  const std::lock_guard<std::mutex> lock(mutex_);
  if (const auto it = plans_.find(key); it != plans_.end()) return it->second;
  if (const auto it = unsupported_.find(key); it != unsupported_.end()) throw Error(ErrorCode::Unsupported, it->second);
  int current = -1;
  DDIM_CUDA_CHECK(cudaGetDevice(&current));
  if (current != device_)
    throw Error(ErrorCode::Internal, "cudnn plan cache of device " + std::to_string(device_) + " used on device " +
                                         std::to_string(current));
  try {
    auto plan = std::make_shared<const CudnnConv>(handle_, shape, dtype, epilogue, autotune);
    plans_.emplace(key, plan);
    return plan;
  } catch (const CudnnEnvironmentError&) {
    throw;
  } catch (const Error& e) {
    if (e.code() == ErrorCode::Unsupported) unsupported_.emplace(key, e.what());
    throw;
  }
}

std::size_t ConvPlanCache::size() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  return plans_.size();
}

std::size_t ConvPlanCache::max_workspace_bytes() const {
  const std::lock_guard<std::mutex> lock(mutex_);
  std::size_t m = 0;
  for (const auto& [key, plan] : plans_) m = std::max(m, plan->workspace_bytes());
  return m;
}

}  // namespace ddim::cuda
