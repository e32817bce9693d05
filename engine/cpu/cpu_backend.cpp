#include "cpu/cpu_backend.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "cpu/isa.hpp"
#include "cpu/ops.hpp"
#include "ddim/error.hpp"
#include "cpu/thread_pool.hpp"
#include "host_memory.hpp"
#include "kernels/philox.h"
#include "sampler/finite.hpp"
#include "sampler/noise.hpp"
#include "schedule/ddim_params.hpp"

namespace ddim::cpu {

using graph::Kind;
using graph::Node;
using graph::Op;

namespace {

Conv2dShape conv_shape(const graph::Graph& g, const Node& n, int batch) {
  const auto& x = g.values[n.inputs[0]];
  return Conv2dShape{batch, x.c, x.h, x.w, n.out_channels, n.kernel_h, n.kernel_w, n.stride_h, n.stride_w,
                     n.pad_t, n.pad_b, n.pad_l, n.pad_r};
}

AttentionWeights attention_weights(const NodeWeights& w) {
  using namespace plan;
  return AttentionWeights{w[kQWeight], w[kQBias], w[kKWeight], w[kKBias], w[kVWeight], w[kVBias], w[kOutWeight], w[kOutBias]};
}

int attention_dim(const graph::Graph& g, const Node& n) { return n.inner_dim ? n.inner_dim : g.values[n.inputs[0]].c; }

float attention_scale(const graph::Graph& g, const Node& n) {
  return n.attn_scale ? float(*n.attn_scale) : float(1.0 / std::sqrt(double(attention_dim(g, n) / n.heads)));
}

}  // namespace

CpuExecutor::CpuExecutor(const ExecutorContext& ctx, const SessionOptions& options)
    : model_(ctx.model), m_(ctx.model->impl()), g_(ctx.model->impl().graph), batch_(options.batch) {
  // The instruction set (DDIM_CPU_ISA may narrow it) and the GEMM kernel: fixed for the session,
  // since the weights are packed for it.
  isa_ = active_isa();
  const bool bf16 = options.precision == Precision::BF16;
  if (options.precision == Precision::FP16)
    throw Error(ErrorCode::Unsupported, "the CPU backend computes in fp32 or bf16; precision fp16 needs the CUDA backend");
  spec_ = &kernel_spec(isa_, bf16 ? GemmPrecision::Bf16 : GemmPrecision::Fp32);  // bf16: throws naming what is missing

  graph::infer_shapes(g_, ctx.height, ctx.width);
  fold_ = graph::fold_time_only(g_);
  graph::FusedGraph fused = graph::fuse_conv_adds(g_);
  step_ = std::move(fused.graph);
  step_node_of_ = std::move(fused.node_of);
  fusion_ = std::move(fused.fusion);
  step_fold_ = graph::fold_time_only(step_);
  if (step_fold_.tables != fold_.tables)
    throw Error(ErrorCode::Internal, "cpu: the fused step graph reads other time tables than the model's graph");
  // A class-conditional model may be sampled with classifier-free guidance: a forward of 2N. The
  // plan holds 2N (every buffer then also serves a forward of N).
  plan_batch_ = g_.class_labels >= 0 ? 2 * batch_ : batch_;
  run_batch_ = batch_;
  mem_ = graph::plan_memory(step_, step_fold_, plan_batch_, sizeof(float));
  pool_ = std::make_unique<ThreadPool>(options.threads);
  std::size_t scratch = 0, packed_bytes = 0;
  for (int i : step_fold_.step_nodes) {
    const Node& n = step_.nodes[i];
    const auto& x = step_.values[n.inputs[0]];
    if (n.op == Op::Conv2d) {
      packed_bytes += std::size_t(n.out_channels + 8) * std::size_t(x.c) * n.kernel_h * n.kernel_w * spec_->elem_bytes();
    } else if (n.op == Op::Attention) {
      const int d = attention_dim(step_, n);
      scratch = std::max(scratch, attention_scratch_floats(plan_batch_, x.c, x.h * x.w, d, pool_.get()));
      packed_bytes += std::size_t(4 * d + 8) * std::size_t(x.c) * spec_->elem_bytes();
    }
  }
  check_fits_host_memory(std::uint64_t(mem_.arena_bytes) + std::uint64_t(scratch) * sizeof(float),
                         "cpu: the activation arena for batch " + std::to_string(plan_batch_));
  check_fits_host_memory(packed_bytes, std::string("cpu: the weights packed for the ") + spec_->name + " kernel");
  try {
    arena_.assign(mem_.arena_bytes / sizeof(float), 0.f);
    scratch_.assign(scratch, 0.f);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, "cpu: cannot allocate the " + std::to_string(mem_.arena_bytes + scratch * 4) +
                                            "-byte activation arena for batch " + std::to_string(batch_));
  }
  node_weights_ = plan::resolve_node_weights(g_, m_);  // once here, not by name on every step
  // Every convolution's and attention's weights, packed once for spec_.
  packed_.resize(step_.nodes.size());
  for (int i : step_fold_.step_nodes) {
    const Node& n = step_.nodes[i];
    const NodeWeights& w = node_weights_[std::size_t(step_node_of_[std::size_t(i)])];
    if (n.op == Op::Conv2d) {
      pack_conv_weights(conv_shape(step_, n, batch_), w[plan::kWeight], *spec_, packed_[std::size_t(i)].conv, pool_.get());
    } else if (n.op == Op::Attention) {
      pack_attention(attention_weights(w), step_.values[n.inputs[0]].c, attention_dim(step_, n), *spec_,
                     packed_[std::size_t(i)].attention, pool_.get());
    }
  }
  tables_.resize(g_.values.size());
  info_.backend = "cpu (" + std::to_string(pool_->size()) + " threads, " + to_string(isa_) + ")";
  info_.precision = bf16 ? "bf16" : "fp32";
  info_.batch = batch_;
  info_.height = ctx.height;
  info_.width = ctx.width;
  for (int i : fold_.time_nodes) {
    info_.folded_nodes.push_back(g_.nodes[i].name);
    if (fold_.per_label[std::size_t(g_.nodes[i].output)]) info_.folded_per_label.push_back(g_.nodes[i].name);
  }
  info_.forward_batch = plan_batch_;
  for (int i : step_fold_.step_nodes) {
    const Node& n = step_.nodes[i];
    if (n.op == Op::GroupNorm && n.silu) info_.fusions.push_back(n.name + ": group_norm + silu");
    const graph::ConvFusion& f = fusion_[std::size_t(i)];
    if (f.temb >= 0) info_.fusions.push_back(g_.nodes[std::size_t(step_node_of_[std::size_t(i)])].name + ": conv2d + time-embedding add");
    if (f.residual >= 0) info_.fusions.push_back(g_.nodes[std::size_t(step_node_of_[std::size_t(i)])].name + ": conv2d + residual add");
  }
  info_.arena_bytes = mem_.arena_bytes;
  info_.unplanned_bytes = mem_.unplanned_bytes;
  info_.weight_bytes = m_.weights.size() * sizeof(float);
  info_.forward_flops = graph::forward_flops(g_, fold_, batch_);
}

CpuExecutor::~CpuExecutor() = default;

int CpuExecutor::threads() const { return pool_->size(); }

std::size_t CpuExecutor::sample_elems() const { return std::size_t(g_.values[g_.sample].elements()); }
std::size_t CpuExecutor::out_elems() const { return std::size_t(g_.values[g_.output].elements()); }

void run_node(const graph::Graph& g, const Node& n, const NodeWeights& weights, int batch, const std::vector<const float*>& in,
              float* y, float* scratch, ThreadPool* pool, const KernelSpec* spec) {
  const auto& x = g.values[n.inputs[0]];
  using namespace plan;
  auto w = [&](Role r) { return weights[r]; };
  const std::size_t count = std::size_t(batch) * std::size_t(x.elements());
  if (n.op == Op::Attention && !scratch) throw Error(ErrorCode::Internal, "run_node: " + n.name + " needs scratch memory");
  auto kernel = [&]() -> const KernelSpec& { return spec ? *spec : selected_fp32_kernel(); };
  switch (n.op) {
    case Op::TimestepEmbedding:
      timestep_embedding(in[0], batch, n.dim, n.flip_sin_to_cos, float(n.freq_shift), float(n.max_period), float(n.scale), y);
      break;
    case Op::Embedding:
      for (int b = 0; b < batch; ++b) {
        const float label = in[0][b];
        if (!(label >= 0.f && label < float(n.num_embeddings) && label == std::floor(label)))
          throw Error(ErrorCode::InvalidArgument, "class label " + std::to_string(label) + " is not an integer in [0, " +
                                                      std::to_string(n.num_embeddings) + ") (node '" + n.name + "': the model has " +
                                                      std::to_string(n.num_embeddings) + " classes)");
        std::memcpy(y + std::size_t(b) * std::size_t(n.dim), w(kWeight) + std::size_t(label) * std::size_t(n.dim),
                    std::size_t(n.dim) * sizeof(float));
      }
      break;
    case Op::Linear: linear(in[0], batch, x.c, w(kWeight), w(kBias), n.out_features, y, pool); break;
    case Op::Conv2d: {
      const Conv2dShape s = conv_shape(g, n, batch);
      thread_local PackedA packed;
      pack_conv_weights(s, w(kWeight), kernel(), packed, pool);
      ConvEpilogue e;
      e.bias = w(kBias);
      conv2d_packed(s, in[0], packed, e, y, pool);
      break;
    }
    case Op::GroupNorm:
      group_norm(in[0], batch, x.c, x.h * x.w, n.groups, float(n.eps), w(kWeight), w(kBias), n.silu, y, pool);
      break;
    case Op::Silu: silu(in[0], count, y, pool); break;
    case Op::Scale: scale_shift(in[0], count, float(n.scale), float(n.shift), y, pool); break;
    case Op::Add: {
      const auto& b = g.values[n.inputs[1]];
      if (x.kind == b.kind) add(in[0], in[1], count, float(n.divisor), y, pool);
      else add_broadcast(in[0], in[1], batch, x.c, x.h * x.w, float(n.divisor), y, pool);
      break;
    }
    case Op::Concat: {
      std::vector<int> cs;
      for (int v : n.inputs) cs.push_back(g.values[v].c);
      concat_channels(in.data(), cs.data(), int(cs.size()), batch, x.h * x.w, y, pool);
      break;
    }
    case Op::UpsampleNearest2x: upsample_nearest2x(in[0], batch, x.c, x.h, x.w, y, pool); break;
    case Op::AvgPool2x: avg_pool2x(in[0], batch, x.c, x.h, x.w, y, pool); break;
    case Op::Attention: {
      const int d = attention_dim(g, n);
      thread_local PackedAttention packed;
      pack_attention(attention_weights(weights), x.c, d, kernel(), packed, pool);
      attention_packed(in[0], n.inputs.size() > 1 ? in[1] : nullptr, batch, x.c, x.h * x.w, d, n.heads,
                       attention_scale(g, n), packed, float(n.divisor), y, scratch, pool);
      break;
    }
    case Op::VectorQuantize: vector_quantize(in[0], batch, x.c, x.h * x.w, w(kWeight), n.entries, y, nullptr, pool); break;
  }
}

// Node i of step_: convolutions and attention with their packed weights (a convolution with its
// fused adds in the epilogue), everything else as run_node.
void CpuExecutor::run_step_node(int i, const std::vector<const float*>& in, float* out) {
  const Node& n = step_.nodes[std::size_t(i)];
  const NodeWeights& w = node_weights_[std::size_t(step_node_of_[std::size_t(i)])];
  if (n.op == Op::Conv2d) {
    const graph::ConvFusion& f = fusion_[std::size_t(i)];
    ConvEpilogue e;
    e.bias = w[plan::kBias];
    // Values are addressed by index: the fused conv's extra input is the time table row or the residual.
    auto at = [&](int v) { return arena_.data() + mem_.offset[std::size_t(v)] / sizeof(float); };
    if (f.temb >= 0) e.temb = at(f.temb);
    if (f.residual >= 0) e.residual = at(f.residual);
    conv2d_packed(conv_shape(step_, n, run_batch_), in[0], packed_[std::size_t(i)].conv, e, out, pool_.get());
  } else if (n.op == Op::Attention) {
    const auto& x = step_.values[n.inputs[0]];
    attention_packed(in[0], n.inputs.size() > 1 ? in[1] : nullptr, run_batch_, x.c, x.h * x.w, attention_dim(step_, n), n.heads,
                     attention_scale(step_, n), packed_[std::size_t(i)].attention, float(n.divisor), out, scratch_.data(),
                     pool_.get());
  } else {
    run_node(step_, n, w, run_batch_, in, out, scratch_.data(), pool_.get(), spec_);
  }
}

void CpuExecutor::build_tables(std::span<const int> timesteps, const ConditionRows& conditions) {
  const auto& c = conditions.conditions;
  if (table_timesteps_.size() == timesteps.size() && std::equal(timesteps.begin(), timesteps.end(), table_timesteps_.begin()) &&
      table_conditions_.size() == c.size() && (c.empty() || std::memcmp(c.data(), table_conditions_.data(), c.size() * 4) == 0))
    return;
  tables_ = plan::evaluate_time_tables(g_, fold_, node_weights_, timesteps, c);
  table_timesteps_.assign(timesteps.begin(), timesteps.end());
  table_conditions_ = c;
}

void CpuExecutor::forward_rows(const float* x, std::span<const int> trow, const ConditionRows& rows, const Conditioning& cond,
                               float* out) {
  const std::size_t N = std::size_t(batch_), U = rows.count;
  if (!cond.guided()) {
    std::vector<int> r(N);
    for (std::size_t b = 0; b < N; ++b) r[b] = int(std::size_t(trow[b]) * U + std::size_t(rows.of_sample[b]));
    run_batch_ = batch_;
    run_step(x, r, out);
    return;
  }
  const std::size_t E = sample_elems(), O = out_elems();
  x2_.resize(2 * N * E);
  out2_.resize(2 * N * O);
  std::memcpy(x2_.data(), x, N * E * sizeof(float));
  std::memcpy(x2_.data() + N * E, x, N * E * sizeof(float));
  std::vector<int> r(2 * N);
  for (std::size_t b = 0; b < N; ++b) {
    r[b] = int(std::size_t(trow[b]) * U + std::size_t(rows.of_sample[b]));
    r[N + b] = int(std::size_t(trow[b]) * U + std::size_t(rows.null_index));
  }
  run_batch_ = 2 * batch_;
  try {
    run_step(x2_.data(), r, out2_.data());
  } catch (...) {
    run_batch_ = batch_;
    throw;
  }
  run_batch_ = batch_;
  combine_guidance(out2_.data(), N, O, cond.guidance_scale, cond.guidance_rescale, out);
}

void CpuExecutor::run_step(const float* x, std::span<const int> rows, float* out) {
  auto at = [&](int v) { return arena_.data() + mem_.offset[v] / sizeof(float); };
  std::memcpy(at(g_.sample), x, sizeof(float) * run_batch_ * sample_elems());
  for (int v : fold_.tables) {  // the table rows of this step, one per sample
    const std::size_t c = std::size_t(g_.values[v].c);
    for (int b = 0; b < run_batch_; ++b) std::memcpy(at(v) + b * c, tables_[v].data() + std::size_t(rows[b]) * c, c * sizeof(float));
  }
  std::vector<const float*> in;
  for (int i : step_fold_.step_nodes) {
    const Node& n = step_.nodes[i];
    in.clear();
    for (int v : n.inputs) in.push_back(at(v));
    if (!node_timer_) {
      run_step_node(i, in, at(n.output));
      continue;
    }
    const auto start = std::chrono::steady_clock::now();
    run_step_node(i, in, at(n.output));
    node_timer_(n, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::memcpy(out, at(g_.output), sizeof(float) * run_batch_ * out_elems());
}

namespace {

void check_forward_args(std::size_t x_size, std::size_t t_size, std::size_t out_size, int batch, std::size_t in_elems,
                        std::size_t out_elems) {
  if (x_size != std::size_t(batch) * in_elems)
    throw Error(ErrorCode::InvalidArgument, "forward: x has " + std::to_string(x_size) + " values, expected " +
                                                std::to_string(batch) + " x " + std::to_string(in_elems));
  if (t_size != 1 && t_size != std::size_t(batch))
    throw Error(ErrorCode::InvalidArgument, "forward: give one timestep or one per sample (" + std::to_string(batch) + "), not " +
                                                std::to_string(t_size));
  if (out_size != std::size_t(batch) * out_elems) throw Error(ErrorCode::InvalidArgument, "forward: output span has the wrong size");
}

}  // namespace

void CpuExecutor::forward(std::span<const float> x, std::span<const int> t, std::span<float> out, const Conditioning& cond) {
  check_forward_args(x.size(), t.size(), out.size(), batch_, sample_elems(), out_elems());
  std::vector<int> distinct(t.begin(), t.end());
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  const ConditionRows conditions = distinct_conditions(cond, std::size_t(batch_));
  build_tables(distinct, conditions);
  std::vector<int> rows(static_cast<std::size_t>(batch_));
  for (int b = 0; b < batch_; ++b) {
    const int tb = t.size() == 1 ? t[0] : t[std::size_t(b)];
    rows[std::size_t(b)] = int(std::lower_bound(distinct.begin(), distinct.end(), tb) - distinct.begin());
  }
  forward_rows(x.data(), rows, conditions, cond, out.data());
}

void CpuExecutor::forward_unfolded(std::span<const float> x, std::span<const int> t, std::span<float> out,
                                   const NodeObserver& observer, const Conditioning& cond) {
  check_forward_args(x.size(), t.size(), out.size(), batch_, sample_elems(), out_elems());
  std::vector<std::vector<float>> vals(g_.values.size());
  vals[g_.sample].assign(x.begin(), x.end());
  if (g_.class_labels >= 0) {
    if (cond.labels.size() != std::size_t(batch_) * std::size_t(g_.cls.width()))
      throw Error(ErrorCode::Internal, "forward_unfolded: the class labels do not fit the batch");
    vals[g_.class_labels] = cond.labels;
  }
  vals[g_.timestep].resize(std::size_t(batch_));
  for (int b = 0; b < batch_; ++b) vals[g_.timestep][std::size_t(b)] = float(t.size() == 1 ? t[0] : t[std::size_t(b)]);
  std::vector<const float*> in;
  for (const Node& n : g_.nodes) {
    in.clear();
    for (int v : n.inputs) in.push_back(vals[v].data());
    vals[n.output].assign(std::size_t(batch_) * std::size_t(g_.values[n.output].elements()), 0.f);
    run(n, batch_, in, vals[n.output].data());
    if (observer) observer(n, g_.values[n.output], vals[n.output].data());
  }
  std::copy(vals[g_.output].begin(), vals[g_.output].end(), out.begin());
}

std::string CpuExecutor::locate_nonfinite(std::span<const float> x, std::span<const int> t, const Conditioning& cond) {
  std::string where;
  try {
    std::vector<float> out(std::size_t(batch_) * out_elems());
    forward_unfolded(x, t, out, [&](const Node& n, const graph::Value& v, const float* data) {
      if (!where.empty()) return;
      const std::size_t count = std::size_t(batch_) * std::size_t(v.elements());
      if (first_nonfinite(std::span<const float>(data, count)) != kAllFinite) where = node_location(n.name, graph::to_string(n.op));
    }, cond);
  } catch (const Error&) {
    return "";  // only a diagnosis: the caller reports the non-finite value anyway
  } catch (const std::bad_alloc&) {
    return "";
  }
  return where;
}

void CpuExecutor::forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                               const Session::NodeOutputCallback& dump, const Conditioning& cond) {
  forward_unfolded(x, t, out, [&](const Node& n, const graph::Value& v, const float* data) {
    std::vector<std::int64_t> shape{batch_, v.c};
    if (v.kind == Kind::Spatial) {
      shape.push_back(v.h);
      shape.push_back(v.w);
    }
    dump(n.name, shape, std::span<const float>(data, std::size_t(batch_) * std::size_t(v.elements())));
  }, cond);
}

void CpuExecutor::sample(const SampleJob& job, SampleResult& result) {
  const std::size_t S = job.timesteps.size(), N = std::size_t(batch_), E = sample_elems();
  if (out_elems() != E)
    throw Error(ErrorCode::Unsupported, "sampling needs a model whose output has the sample's shape (learned variance "
                                        "outputs are not supported)");
  const ConditionRows conditions = distinct_conditions(job.cond, N);
  build_tables(job.timesteps, conditions);
  std::vector<float> x(N * E), eps(N * E), x0(E), z(E);
  if (!job.x_T.empty()) std::copy(job.x_T.begin(), job.x_T.end(), x.begin());
  else
    for (std::size_t b = 0; b < N; ++b) fill_normal(job.seeds[b], kNoiseStreamInitial, 0, std::span<float>(x.data() + b * E, E));
  // The whole trajectory / x0 history up front (the session checked the sizes): running out of
  // memory is reported before the first step, not after the last.
  if (job.want_trajectory) check_fits_host_memory((S + 1) * N * E * sizeof(float), "cpu: the trajectory");
  if (job.want_x0) check_fits_host_memory(S * N * E * sizeof(float), "cpu: the x0 history");
  try {
    if (job.want_trajectory) result.trajectory.reserve((S + 1) * N * E);
    if (job.want_x0) result.x0.reserve(S * N * E);
  } catch (const std::bad_alloc&) {
    throw Error(ErrorCode::OutOfMemory, "cpu: cannot allocate the " + std::string(job.want_trajectory ? "trajectory" : "x0") +
                                            " history of " + std::to_string(S) + " steps x " + std::to_string(N * E) +
                                            " values (out of host memory)");
  }
  if (job.want_trajectory) result.trajectory.assign(x.begin(), x.end());
  std::vector<int> rows(N);
  const auto step_name = [&](std::size_t s) {
    return "step " + std::to_string(s + 1) + " of " + std::to_string(S) + " (timestep " + std::to_string(job.timesteps[s]) + ")";
  };
  for (std::size_t s = 0; s < S; ++s) {
    std::fill(rows.begin(), rows.end(), int(s));
    forward_rows(x.data(), rows, conditions, job.cond, eps.data());
    if (const std::size_t bad = first_nonfinite(eps); bad != kAllFinite) {
      const std::vector<int> t(N, job.timesteps[s]);
      throw Error(ErrorCode::InvalidArgument, step_name(s) + ": the network's output is NaN or infinite at " +
                                                  element_location(bad, out_elems()) + locate_nonfinite(x, t, job.cond) +
                                                  nonfinite_hint());
    }
    const DdimStepParams& p = job.steps[s];
    for (std::size_t b = 0; b < N; ++b) {
      std::span<float> xb(x.data() + b * E, E);
      std::span<const float> eb(eps.data() + b * E, E);
      std::span<const float> zb;
      if (p.sigma > 0.f) {
        if (!job.noise.empty()) zb = job.noise.subspan((s * N + b) * E, E);
        else {
          fill_normal(job.seeds[b], kNoiseStreamStep, std::uint32_t(s), z);
          zb = z;
        }
      }
      ddim_step_sample(p, xb, eb, zb, x0, xb, job.dynamic_thresholding_ratio, job.sample_max_value);
      if (job.want_x0) result.x0.insert(result.x0.end(), x0.begin(), x0.end());
      if (const std::size_t bad = first_nonfinite(xb); bad != kAllFinite) {
        throw Error(ErrorCode::InvalidArgument, step_name(s) + ": the sampler's update gives NaN or Inf at " +
                                                    element_location(b * E + bad, E) +
                                                    " from a finite network output (the sample or the noise is too "
                                                    "large for float32)");
      }
    }
    if (job.want_trajectory) result.trajectory.insert(result.trajectory.end(), x.begin(), x.end());
    if (job.progress && !job.progress(int(s + 1), int(S)))
      throw Error(ErrorCode::Cancelled, "sampling cancelled by the progress callback after step " + std::to_string(s + 1));
  }
  result.images = std::move(x);
}

}  // namespace ddim::cpu
