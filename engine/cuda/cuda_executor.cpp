#include "cuda/cuda_executor.hpp"

#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "plan/host_plan.hpp"
#include "cuda/check.hpp"
#include "cuda/cudnn_conv.hpp"
#include "cuda/cudnn_loader.hpp"
#include "cuda/threshold.hpp"

namespace ddim::cuda {

using graph::Kind;
using graph::Node;
using graph::Op;

namespace {

// RAII NVTX range (a no-op unless a profiler is attached).
struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

DType dtype_of(Precision p) {
  switch (p) {
    case Precision::FP32: return DType::F32;
    case Precision::BF16: return DType::BF16;
    case Precision::Auto:
    case Precision::FP16: return DType::F16;
  }
  return DType::F16;
}

cudaDataType_t cuda_type(DType t) {
  return t == DType::F32 ? CUDA_R_32F : t == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
}


}  // namespace

// ---------------------------------------------------------------------------------------- plan

CudaExecutor::CudaExecutor(const ExecutorContext& ctx, const SessionOptions& options)
    : model_(ctx.model), m_(ctx.model->impl()), options_(options), dtype_(dtype_of(options.precision)),
      device_(options.device) {
  try {
    init(ctx);
  } catch (...) {
    release();  // a throwing constructor runs no destructor
    throw;
  }
}

void CudaExecutor::init(const ExecutorContext& ctx) {
  DDIM_CUDA_CHECK(cudaSetDevice(device_));
  DDIM_CUDA_CHECK(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  stream_ = own_stream_;
  DDIM_CUBLAS_CHECK(cublasCreate(&cublas_));
  DDIM_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  DDIM_CUBLAS_CHECK(cublasSetPointerMode(cublas_, CUBLAS_POINTER_MODE_HOST));
  open_cudnn();
  g_ = m_.graph;
  graph::infer_shapes(g_, ctx.height, ctx.width);
  plan();
  weights_ = device_weights(model_, device_, dtype_);
  build_program();
  // Every kernel the sampling step launches is loaded now: a kernel's first launch inside a
  // stream capture would load its module there (CUDA's lazy loading), which a capture must not do.
  load_sampling_kernels(dtype_);
  // One eager forward at plan time: loads every kernel and library engine before any capture,
  // and reports a failing configuration here rather than in the first sample. Its inputs (the
  // sample and table slots) are not written yet: zero the arena first, so that the warm-up reads
  // no uninitialised memory (compute-sanitizer initcheck) and computes on no NaN garbage.
  DDIM_CUDA_CHECK(cudaMemsetAsync(arena_.get(), 0, arena_.bytes(), stream_));
  run_forward_ops(stream_);
  DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

// cuDNN for the convolutions, unless it cannot be initialised at all here (cudnnCreate fails: the
// library or its sub-libraries are missing; the CUDA emulator) or DDIM_CUDNN=0 / off turns it off:
// then every convolution runs on the direct kernel, and PlanInfo::warnings says so. (A cuDNN that
// initialises but refuses for environment reasons later fails the plan: see cudnn_conv.hpp.)
void CudaExecutor::open_cudnn() {
  const char* env = std::getenv("DDIM_CUDNN");
  if (env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0)) {
    cudnn_off_ = std::string("DDIM_CUDNN=") + env;
  } else {
    preload_cudnn_sublibraries();
    const cudnnStatus_t s = cudnnCreate(&cudnn_);
    if (s != CUDNN_STATUS_SUCCESS) {
      cudnn_ = nullptr;
      if (classify_cudnn(s) == CudnnFailure::OutOfMemory) throw_cudnn(s, "cudnnCreate", __FILE__, __LINE__);
      cudnn_off_ = "cudnnCreate failed: " + cudnn_status_text(s);
    } else {
      DDIM_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
      convs_ = ConvPlanCache::for_device(device_);
    }
  }
  if (!cudnn_off_.empty())
    info_.warnings.push_back("cuDNN is not used (" + cudnn_off_ +
                             "): every convolution runs on the direct-convolution kernel, which is much slower");
}

CudaExecutor::~CudaExecutor() { release(); }

void CudaExecutor::release() noexcept {
  // Cannot report; a device error here was (or will be) reported by a call.
  if (stream_) (void)cudaStreamSynchronize(stream_);
  if (step_graph_) (void)cudaGraphExecDestroy(step_graph_);
  step_graph_ = nullptr;
  conv_plans_.clear();
  convs_.reset();
  if (cudnn_) (void)cudnnDestroy(cudnn_);
  cudnn_ = nullptr;
  if (cublas_) (void)cublasDestroy(cublas_);
  cublas_ = nullptr;
  if (own_stream_) (void)cudaStreamDestroy(own_stream_);
  own_stream_ = stream_ = nullptr;
  // What failed here must not stay the thread's last error: the next kernel launch anywhere in the
  // process (which checks cudaGetLastError) would report it as its own.
  (void)cudaGetLastError();
}

// The conv + add fusion (graph::fuse_conv_adds) runs before the memory plan, so liveness sees
// each fused convolution reading its time-embedding or residual input.
void CudaExecutor::plan() {
  graph::FusedGraph fused = graph::fuse_conv_adds(g_);
  g_ = std::move(fused.graph);
  node_of_ = std::move(fused.node_of);
  fusion_ = std::move(fused.fusion);
  fold_ = graph::fold_time_only(g_);
  // A class-conditional model may be sampled with classifier-free guidance (a forward of 2N): the
  // plan holds 2N samples, and every buffer also serves the forward of N.
  plan_batch_ = guidance_capable() ? 2 * options_.batch : options_.batch;
  if (plan_batch_ > kMaxBatch)
    throw Error(ErrorCode::InvalidArgument, "cuda: a class-conditional model's guided forward runs 2 x " +
                                                std::to_string(options_.batch) + " samples, more than " +
                                                std::to_string(kMaxBatch) + "; use a batch of at most " +
                                                std::to_string(kMaxBatch / 2));
  mem_ = graph::plan_memory(g_, fold_, plan_batch_, dtype_size(dtype_), 256, {g_.sample});
  arena_ = DeviceBuffer(mem_.arena_bytes, "the activation arena (batch " + std::to_string(plan_batch_) + ")");
  host_weights_.clear();
  {
    // Host fp32 weights of the time-only nodes, indexed like g_ (node_of_ maps to the model graph).
    const std::vector<plan::NodeWeights> all = plan::resolve_node_weights(m_.graph, m_);
    for (int i : node_of_) host_weights_.push_back(all[std::size_t(i)]);
  }

  info_.backend = [&] {
    cudaDeviceProp prop{};
    DDIM_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    return "cuda:" + std::to_string(device_) + " (" + prop.name + ")";
  }();
  info_.precision = to_string(dtype_);
  info_.batch = options_.batch;
  info_.height = ctx_height_ = g_.values[g_.sample].h;
  info_.width = ctx_width_ = g_.values[g_.sample].w;
  for (int i : fold_.time_nodes) {
    info_.folded_nodes.push_back(g_.nodes[i].name);
    if (fold_.per_label[std::size_t(g_.nodes[i].output)]) info_.folded_per_label.push_back(g_.nodes[i].name);
  }
  info_.forward_batch = plan_batch_;
  info_.arena_bytes = mem_.arena_bytes;
  info_.unplanned_bytes = mem_.unplanned_bytes;
  info_.forward_flops = graph::forward_flops(g_, fold_, options_.batch);
}

void* CudaExecutor::value_ptr(int v) const {
  if (mem_.offset[v] == graph::MemoryPlan::kNone)
    throw Error(ErrorCode::Internal, "cuda: value '" + g_.values[v].name + "' has no place in the arena");
  return static_cast<unsigned char*>(arena_.get()) + mem_.offset[v];
}


// ------------------------------------------------------------------------------- the program

namespace {

// Row-major C (M, N) = A (M, K) * W (N, K)^T (+ beta * C), fp32 accumulation; fp32 data without
// TF32 (pedantic compute), fp16 / bf16 on tensor cores.
void gemm_rows(cublasHandle_t h, DType t, int M, int N, int K, const void* A, const void* W, void* C, float beta) {
  const float alpha = 1.f;
  const cudaDataType_t type = cuda_type(t);
  const cublasComputeType_t compute = t == DType::F32 ? CUBLAS_COMPUTE_32F_PEDANTIC : CUBLAS_COMPUTE_32F;
  // Column-major view: C^T (N, M) = W (N, K) * A^T (K, M).
  DDIM_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, W, type, K, A, type, K, &beta, C, type, N,
                                 compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

// The step program for a forward of n samples: program_ (the batch) and, for a class-conditional
// model, program2_ (2x the batch: classifier-free guidance's conditional and null halves).
void CudaExecutor::build_program() {
  std::size_t workspace = 0, attention_scratch = 0;
  program_ = build_ops(options_.batch, true, workspace, attention_scratch);
  program2_.clear();
  if (guidance_capable()) program2_ = build_ops(2 * options_.batch, false, workspace, attention_scratch);
  workspace_.reserve(workspace, "the cuDNN workspace");
  attention_scratch_.reserve(attention_scratch, "the attention q/k/v scratch");
  // cuBLAS gets its own workspace, so that it never allocates (not allowed inside a capture).
  cublas_workspace_.reserve(std::size_t(32) << 20, "the cuBLAS workspace");
  DDIM_CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_.get(), cublas_workspace_.bytes()));
  info_.weight_bytes = weights_->storage.bytes();
  info_.arena_bytes = mem_.arena_bytes + workspace_.bytes() + attention_scratch_.bytes();
}

std::vector<CudaExecutor::StepOp> CudaExecutor::build_ops(int n, bool report, std::size_t& workspace,
                                                           std::size_t& attention_scratch) {
  std::vector<StepOp> program;
  const DType t = dtype_;
  // The plan report lists each fusion once (the 2N program repeats the N program's).
  std::vector<std::string> unreported;
  std::vector<std::string>& fusions = report ? info_.fusions : unreported;
  for (int i : fold_.step_nodes) {
    const Node& node = g_.nodes[i];
    const NodeDeviceParams& p = weights_->nodes[std::size_t(node_of_[std::size_t(i)])];
    const graph::Value& xv = g_.values[node.inputs[0]];
    const graph::Value& yv = g_.values[node.output];
    const void* x = value_ptr(node.inputs[0]);
    void* y = value_ptr(node.output);
    const int hw = xv.h * xv.w;
    const std::size_t count = std::size_t(n) * std::size_t(xv.elements());
    StepOp op;
    op.name = node.name;
    switch (node.op) {
      case Op::Conv2d: {
        const graph::ConvFusion f = fusion_[std::size_t(i)];
        const ConvShape s{n, xv.h, xv.w, xv.c, node.out_channels, node.kernel_h, node.kernel_w, node.stride_h, node.stride_w,
                          node.pad_t, node.pad_b, node.pad_l, node.pad_r};
        ConvEpilogue epi;
        epi.bias = p.bias != nullptr;
        epi.time_add = f.temb >= 0;
        epi.residual_add = f.residual >= 0;
        const void* temb = f.temb >= 0 ? value_ptr(f.temb) : nullptr;
        const void* residual = f.residual >= 0 ? value_ptr(f.residual) : nullptr;
        std::string what = node.name + ": conv " + std::to_string(node.kernel_h) + "x" + std::to_string(node.kernel_w);
        if (epi.bias) what += " + bias";
        if (epi.time_add) what += " + time embedding";
        if (epi.residual_add) what += " + residual";
        const CudnnConv* conv = nullptr;
        if (!convs_) {
          fusions.push_back(what + " [direct kernel; cuDNN not used]");
        } else {
          try {
            conv_plans_.push_back(convs_->get(s, t, epi, options_.autotune));
            conv = conv_plans_.back().get();
          } catch (const CudnnEnvironmentError&) {
            throw;  // cuDNN is unusable here: the plan fails (with --device auto: the CPU)
          } catch (const Error& e) {
            if (e.code() != ErrorCode::Unsupported) throw;
            fusions.push_back(what + " [direct kernel; cuDNN: " + e.what() + "]");
          }
        }
        if (conv) {
          workspace = std::max(workspace, conv->workspace_bytes());
          fusions.push_back(what + " [cuDNN " + (conv->fused() ? "fused" : "conv + epilogue kernel") + ", " +
                                  conv->engine_description() + "]");
          op.run = [this, conv, x, w = p.weight, b = p.bias, temb, residual, y](cudaStream_t st) {
            conv->run(cudnn_, x, w, b, temb, residual, y, workspace_.get(), st);
          };
        } else {
          op.run = [s, x, w = p.weight, b = p.bias, temb, residual, y, t, hw_out = yv.h * yv.w, k = node.out_channels, n](cudaStream_t st) {
            conv2d_direct(s, x, w, b, y, t, st);
            if (temb || residual) conv_epilogue(y, t, n, hw_out, k, nullptr, temb, residual, st);
          };
        }
        break;
      }
      case Op::GroupNorm:
        if (node.silu) fusions.push_back(node.name + ": group_norm + silu");
        op.run = [=, gamma = p.gamma, beta = p.beta, groups = node.groups, eps = float(node.eps), silu_after = node.silu,
                  c = xv.c](cudaStream_t st) { group_norm(x, y, t, n, hw, c, groups, eps, gamma, beta, silu_after, st); };
        break;
      case Op::Silu: op.run = [=](cudaStream_t st) { silu(x, y, t, count, st); }; break;
      case Op::Scale:
        op.run = [=, a = float(node.scale), b = float(node.shift)](cudaStream_t st) { scale_shift(x, y, t, count, a, b, st); };
        break;
      case Op::Add: {
        const graph::Value& bv = g_.values[node.inputs[1]];
        const void* b = value_ptr(node.inputs[1]);
        const float divisor = float(node.divisor);
        if (xv.kind == bv.kind) op.run = [=](cudaStream_t st) { add(x, b, y, t, count, divisor, st); };
        else op.run = [=, c = xv.c](cudaStream_t st) { add_broadcast(x, b, y, t, n, hw, c, divisor, st); };
        break;
      }
      case Op::Concat: {
        if (node.inputs.size() > std::size_t(kMaxConcat))
          throw Error(ErrorCode::Unsupported, "cuda: " + node.name + " concatenates more than " + std::to_string(kMaxConcat) + " inputs");
        std::vector<const void*> xs;
        std::vector<int> cs;
        for (int v : node.inputs) {
          xs.push_back(value_ptr(v));
          cs.push_back(g_.values[v].c);
        }
        op.run = [=](cudaStream_t st) { concat_channels(xs.data(), cs.data(), int(xs.size()), y, t, n, hw, st); };
        break;
      }
      case Op::UpsampleNearest2x:
        op.run = [=, h = xv.h, w = xv.w, c = xv.c](cudaStream_t st) { upsample_nearest2x(x, y, t, n, h, w, c, st); };
        break;
      case Op::AvgPool2x:
        op.run = [=, h = xv.h, w = xv.w, c = xv.c](cudaStream_t st) { avg_pool2x(x, y, t, n, h, w, c, st); };
        break;
      case Op::Linear:
        op.run = [this, t, n, x, y, w = p.weight, b = p.bias, in = xv.c, out = node.out_features](cudaStream_t st) {
          gemm_rows(cublas_, t, n, out, in, x, w, y, 0.f);  // cuBLAS runs on stream_ (= st)
          bias_divide_rows(y, t, std::size_t(n), out, b, 1.f, st);
        };
        break;
      case Op::Attention: {
        const int c = xv.c, d = node.inner_dim ? node.inner_dim : xv.c, heads = node.heads;
        const int M = n * hw;
        const float scale = node.attn_scale ? float(*node.attn_scale) : 1.f / std::sqrt(float(d / heads));
        const std::size_t es = dtype_size(t);
        attention_scratch = std::max(attention_scratch, std::size_t(M) * std::size_t(4 * d) * es);
        const void* residual = node.inputs.size() > 1 ? value_ptr(node.inputs[1]) : nullptr;
        const std::size_t y_bytes = std::size_t(M) * std::size_t(c) * es;
        op.run = [=, this, rescale = float(node.divisor)](cudaStream_t st) {
          auto* qkv = attention_scratch_.as<unsigned char>();
          unsigned char* o = qkv + std::size_t(M) * std::size_t(3 * d) * es;
          gemm_rows(cublas_, t, M, 3 * d, c, x, p.w_qkv, qkv, 0.f);
          bias_divide_rows(qkv, t, std::size_t(M), 3 * d, p.b_qkv, 1.f, st);
          const AttentionShape a{n, hw, heads, d / heads, 3 * d, 3 * d, 3 * d, d, scale};
          attention(a, qkv, qkv + std::size_t(d) * es, qkv + std::size_t(2 * d) * es, o, t, st);
          if (residual) DDIM_CUDA_CHECK(cudaMemcpyAsync(y, residual, y_bytes, cudaMemcpyDeviceToDevice, st));
          gemm_rows(cublas_, t, M, c, d, o, p.w_out, y, residual ? 1.f : 0.f);
          bias_divide_rows(y, t, std::size_t(M), c, p.b_out, rescale, st);
        };
        break;
      }
      case Op::VectorQuantize:
        if (xv.c > kMaxVqChannels)
          throw Error(ErrorCode::Unsupported, "cuda: " + node.name + " quantises " + std::to_string(xv.c) +
                                                  " channels; the kernel takes at most " + std::to_string(kMaxVqChannels));
        op.run = [=, codebook = p.codebook, entries = node.entries, c = xv.c](cudaStream_t st) {
          vector_quantize(x, y, nullptr, t, n, hw, c, codebook, entries, st);
        };
        break;
      case Op::TimestepEmbedding:
      case Op::Embedding:
        throw Error(ErrorCode::Internal, "cuda: " + std::string(graph::to_string(node.op)) + " node " + node.name +
                                             " was not folded into a table");
    }
    program.push_back(std::move(op));
  }
  return program;
}

void CudaExecutor::run_forward_ops(cudaStream_t stream, bool doubled) {
  for (const StepOp& op : doubled ? program2_ : program_) {
    if (options_.profile) {
      NvtxRange range(op.name.c_str());
      op.run(stream);
    } else {
      op.run(stream);
    }
  }
}

// ------------------------------------------------------------------------------ public calls

template <class F>
auto CudaExecutor::guarded(const char* what, F&& f) -> decltype(f()) {
  if (!lost_.empty())
    throw Error(ErrorCode::DeviceLost, std::string(what) + ": the CUDA device was lost earlier in this session (" + lost_ +
                                           "); create a new session after the process restarts");
  try {
    DDIM_CUDA_CHECK(cudaSetDevice(device_));
    return f();
  } catch (const Error& e) {
    if (e.code() == ErrorCode::DeviceLost) lost_ = e.what();
    throw;
  }
}

// Host fp32 pieces converted into device buffers of the element type: one copy through the
// staging buffer for all of them, one conversion each, in stream order. The host vectors may go
// when this returns: cudaMemcpyAsync stages pageable memory before it returns (CUDA's "API
// synchronization behavior"), though the driver may wait for the stream to do so.
void CudaExecutor::upload_converted(const std::vector<std::pair<std::span<const float>, void*>>& pieces) {
  std::size_t total = 0;
  for (const auto& [src, dst] : pieces) total += src.size();
  if (total == 0) return;
  std::vector<float> packed;
  packed.reserve(total);
  for (const auto& [src, dst] : pieces) packed.insert(packed.end(), src.begin(), src.end());
  staging_.reserve(total * 4, "the host-layout staging buffer");
  DDIM_CUDA_CHECK(cudaMemcpyAsync(staging_.get(), packed.data(), total * 4, cudaMemcpyHostToDevice, stream_));
  std::size_t offset = 0;
  for (const auto& [src, dst] : pieces) {
    convert_from_f32(staging_.as<float>() + offset, dst, dtype_, src.size(), stream_);
    offset += src.size();
  }
}

void CudaExecutor::check_device_pointer(const void* p, const char* what) const {
  cudaPointerAttributes attr{};
  const cudaError_t e = cudaPointerGetAttributes(&attr, p);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw Error(ErrorCode::InvalidArgument, std::string(what) + ": not a pointer CUDA knows (" + cudaGetErrorString(e) + ")");
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged)
    throw Error(ErrorCode::InvalidArgument, std::string(what) + " is not device memory (host memory?): give a device pointer");
  if (attr.device != device_)
    throw Error(ErrorCode::InvalidArgument, std::string(what) + " is on CUDA device " + std::to_string(attr.device) +
                                                "; the session's is " + std::to_string(device_));
}

void CudaExecutor::set_stream(void* cuda_stream) {
  guarded("set_stream", [&] {
    cudaStream_t next = cuda_stream ? static_cast<cudaStream_t>(cuda_stream) : own_stream_;
    if (next == stream_) return;
    int device = -1;
    const cudaError_t e = cudaStreamGetDevice(next, &device);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw Error(ErrorCode::InvalidArgument, std::string("set_stream: not a CUDA stream (") + cudaGetErrorString(e) + ")");
    }
    if (device != device_)
      throw Error(ErrorCode::InvalidArgument, "set_stream: the stream belongs to CUDA device " + std::to_string(device) +
                                                  "; the session's is " + std::to_string(device_));
    // The new stream waits for what this session enqueued on the old one: its buffers (arena,
    // state, results) are reused by the next call.
    cudaEvent_t done = nullptr;
    DDIM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    const cudaError_t r = cudaEventRecord(done, stream_);
    const cudaError_t w = r == cudaSuccess ? cudaStreamWaitEvent(next, done, 0) : r;
    (void)cudaEventDestroy(done);  // allowed while recorded / waited for
    DDIM_CUDA_CHECK(w);
    stream_ = next;
    DDIM_CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
    if (cudnn_) DDIM_CUDNN_CHECK(cudnnSetStream(cudnn_, stream_));
  });
}

void CudaExecutor::upload_tables(std::span<const int> timesteps, const ConditionRows& conditions) {
  const std::vector<float>& c = conditions.conditions;
  if (table_timesteps_.size() == timesteps.size() && std::equal(timesteps.begin(), timesteps.end(), table_timesteps_.begin()) &&
      table_conditions_.size() == c.size() && (c.empty() || std::memcmp(c.data(), table_conditions_.data(), c.size() * 4) == 0))
    return;
  const std::vector<std::vector<float>> host = plan::evaluate_time_tables(g_, fold_, host_weights_, timesteps, c);
  tables_.resize(g_.values.size());
  std::vector<std::pair<std::span<const float>, void*>> pieces;
  for (int v : fold_.tables) {
    if (tables_[v].reserve(host[v].size() * dtype_size(dtype_), "the time table " + g_.values[v].name)) step_graph_valid_ = false;
    pieces.emplace_back(host[v], tables_[v].get());
  }
  upload_converted(pieces);
  table_timesteps_.assign(timesteps.begin(), timesteps.end());
  table_conditions_ = c;
}

void CudaExecutor::forward(std::span<const float> x, std::span<const int> t, std::span<float> out, const Conditioning& cond) {
  forward_impl(x, t, out, nullptr, cond);
}

void CudaExecutor::forward_dump(std::span<const float> x, std::span<const int> t, std::span<float> out,
                                const Session::NodeOutputCallback& dump, const Conditioning& cond) {
  forward_impl(x, t, out, &dump, cond);
}

// With `dump`: the time tables the step reads (computed on the host, fp32), then every step
// node's output as the device holds it (converted to fp32, NCHW), op by op with a synchronisation
// after each. A convolution with a fused add reports under the add's name (its own output never
// exists); the other time-only nodes are not reported.
void CudaExecutor::forward_impl(std::span<const float> x, std::span<const int> t, std::span<float> out,
                                const Session::NodeOutputCallback* dump, const Conditioning& cond) {
  guarded("forward", [&] {
    const int n = options_.batch;
    // Guided: 2N samples (the conditional half, then the null half of the same x), combined into
    // the first N before the output is read.
    const bool guided = cond.guided();
    if (guided && dump) throw Error(ErrorCode::Internal, "cuda: a dumped forward takes no guidance");
    const int fb = guided ? 2 * n : n;
    const ConditionRows conditions = distinct_conditions(cond, std::size_t(n));
    const graph::Value& sv = g_.values[g_.sample];
    const graph::Value& ov = g_.values[g_.output];
    const std::size_t in_elems = std::size_t(sv.elements()), out_elems = std::size_t(ov.elements());
    if (x.size() != std::size_t(n) * in_elems || (t.size() != 1 && t.size() != std::size_t(n)) ||
        out.size() != std::size_t(n) * out_elems)
      throw Error(ErrorCode::InvalidArgument, "forward: x, t or out has the wrong size for batch " + std::to_string(n));
    NvtxRange range("ddim.forward");
    std::vector<int> distinct(t.begin(), t.end());
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    const std::vector<std::vector<float>> host =
        plan::evaluate_time_tables(g_, fold_, host_weights_, distinct, conditions.conditions);
    // Table rows per sample (row = timestep index * U + condition), straight into the arena.
    const std::size_t U = conditions.count;
    std::vector<std::vector<float>> rows;
    std::vector<std::pair<std::span<const float>, void*>> pieces;
    for (int v : fold_.tables) {
      const std::size_t c = std::size_t(g_.values[v].c);
      std::vector<float>& r = rows.emplace_back(std::size_t(fb) * c);
      for (int b = 0; b < fb; ++b) {
        const int tb = t.size() == 1 ? t[0] : t[std::size_t(b % n)];
        const std::size_t ti = std::size_t(std::lower_bound(distinct.begin(), distinct.end(), tb) - distinct.begin());
        const std::size_t u = std::size_t(b < n ? conditions.of_sample[std::size_t(b)] : conditions.null_index);
        std::copy_n(host[v].data() + (ti * U + u) * c, c, r.data() + std::size_t(b) * c);
      }
    }
    for (std::size_t i = 0; i < fold_.tables.size(); ++i) pieces.emplace_back(rows[i], value_ptr(fold_.tables[i]));
    upload_converted(pieces);
    if (dump)
      for (std::size_t i = 0; i < fold_.tables.size(); ++i) {
        const graph::Value& tv = g_.values[fold_.tables[i]];
        (*dump)(tv.name, {n, tv.c}, rows[i]);
      }
    staging_.reserve(std::max(x.size(), out.size()) * 4, "the host-layout staging buffer");
    DDIM_CUDA_CHECK(cudaMemcpyAsync(staging_.get(), x.data(), x.size() * 4, cudaMemcpyHostToDevice, stream_));
    nchw_f32_to_nhwc(staging_.as<float>(), value_ptr(g_.sample), dtype_, n, sv.c, sv.h * sv.w, stream_);
    if (guided) {
      const std::size_t half = std::size_t(n) * in_elems * dtype_size(dtype_);
      DDIM_CUDA_CHECK(cudaMemcpyAsync(static_cast<unsigned char*>(value_ptr(g_.sample)) + half, value_ptr(g_.sample), half,
                                      cudaMemcpyDeviceToDevice, stream_));
      run_forward_ops(stream_, true);
      cfg_combine(value_ptr(g_.output), dtype_, n, out_elems, float(cond.guidance_scale), float(cond.guidance_rescale),
                  stream_);
    } else if (!dump) {
      run_forward_ops(stream_);
    } else {
      std::size_t largest = 0;
      for (int i : fold_.step_nodes) largest = std::max(largest, std::size_t(g_.values[g_.nodes[i].output].elements()));
      fetch_.reserve(largest * std::size_t(n) * 4, "the dump buffer");
      std::vector<float> host_values;
      for (std::size_t k = 0; k < program_.size(); ++k) {
        program_[k].run(stream_);
        const graph::Value& v = g_.values[g_.nodes[fold_.step_nodes[k]].output];
        const bool spatial = v.kind == Kind::Spatial;
        const int hw = spatial ? v.h * v.w : 1;
        nhwc_to_nchw_f32(value_ptr(g_.nodes[fold_.step_nodes[k]].output), fetch_.as<float>(), dtype_, n, v.c, hw, stream_);
        host_values.resize(std::size_t(n) * std::size_t(v.elements()));
        DDIM_CUDA_CHECK(cudaMemcpyAsync(host_values.data(), fetch_.get(), host_values.size() * 4, cudaMemcpyDeviceToHost, stream_));
        DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
        std::vector<std::int64_t> shape{n, v.c};
        if (spatial) shape.insert(shape.end(), {v.h, v.w});
        (*dump)(v.name, shape, host_values);
      }
    }
    nhwc_to_nchw_f32(value_ptr(g_.output), staging_.as<float>(), dtype_, n, ov.c, ov.h * ov.w, stream_);
    DDIM_CUDA_CHECK(cudaMemcpyAsync(out.data(), staging_.get(), out.size() * 4, cudaMemcpyDeviceToHost, stream_));
    DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  });
}


void CudaExecutor::sample(const SampleJob& job, SampleResult& result) {
  guarded("sample", [&] {
    const int n = options_.batch;
    const graph::Value& sv = g_.values[g_.sample];
    const graph::Value& ov = g_.values[g_.output];
    if (ov.c != sv.c || ov.h != sv.h || ov.w != sv.w)
      throw Error(ErrorCode::Unsupported, "sampling needs a model whose output has the sample's shape (learned variance "
                                          "outputs are not supported)");
    const bool thresholding =
        std::any_of(job.steps.begin(), job.steps.end(), [](const DdimStepParams& p) { return p.clip == kClipThreshold; });
    const std::size_t S = job.steps.size(), E = std::size_t(sv.elements()), NE = std::size_t(n) * E;
    const int c = sv.c, hw = sv.h * sv.w;
    NvtxRange range("ddim.sample");
    const std::size_t threshold_scratch = thresholding ? dynamic_threshold_scratch_bytes(n, E) : 0;
    const std::size_t threshold_bytes = NE * 4 + 256 + std::size_t(n) * 4 + 256 + threshold_scratch;

    // The caller's device memory must be this device's.
    if (job.x_T_device) check_device_pointer(job.x_T_device, "x_T_device");
    if (job.noise_device) check_device_pointer(job.noise_device, "noise_device");
    if (job.output_device) check_device_pointer(job.output_device, "output_device");

    // The caller may capture sample_async into a CUDA graph of its own (the session's stream is
    // theirs, being captured): then every launch goes into their capture (no graph of ours), and
    // nothing may allocate, synchronise or copy from host memory that is gone by the replay, so a
    // first call with the same options outside the capture must have made the buffers and tables.
    cudaStreamCaptureStatus capture_status = cudaStreamCaptureStatusNone;
    DDIM_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture_status));
    const bool in_caller_capture = capture_status != cudaStreamCaptureStatusNone;
    if (in_caller_capture) {
      if (!job.async)
        throw Error(ErrorCode::InvalidArgument, "the session's stream is being captured into a CUDA graph: only sample_async "
                                                "can be captured (sample waits for its results)");
      const bool ready = params_.bytes() >= S * sizeof(DdimStepParams) && seeds_.bytes() >= std::size_t(n) * 8 &&
                         step_index_.bytes() >= sizeof(int) && x_.bytes() >= NE * 4 &&
                         std::equal(job.timesteps.begin(), job.timesteps.end(), table_timesteps_.begin(), table_timesteps_.end()) &&
                         distinct_conditions(job.cond, std::size_t(n)).conditions == table_conditions_ &&
                         (!thresholding || threshold_buffer_.bytes() >= threshold_bytes) &&
                         (!job.output_session_precision || dtype_ == DType::F32 || output_.bytes() >= NE * 4);
      if (!ready)
        throw Error(ErrorCode::InvalidArgument, "sample_async inside the caller's CUDA graph capture would allocate device memory "
                                                "or upload time tables: make one call with the same options outside the capture "
                                                "first");
    }

    // Per-call uploads: step parameters and seeds (in kernel parameters: asynchronous, no staging),
    // the time tables (when the timesteps changed), the caller's host noise.
    if (params_.reserve(S * sizeof(DdimStepParams), "the step parameters")) step_graph_valid_ = false;
    copy_from_host_inline(params_.get(), job.steps.data(), S * sizeof(DdimStepParams), stream_);
    if (seeds_.reserve(std::size_t(n) * 8, "the seeds")) step_graph_valid_ = false;
    copy_from_host_inline(seeds_.get(), job.seeds.data(), std::size_t(n) * 8, stream_);
    if (step_index_.reserve(sizeof(int), "the step counter")) step_graph_valid_ = false;
    // Class-conditional models: tables per (step, condition) and each sample's row per step (the
    // null half's rows after the conditional half's when guided).
    const ConditionRows conditions = distinct_conditions(job.cond, std::size_t(n));
    const bool conditional = job.cond.width > 0, guided = job.cond.guided();
    upload_tables(job.timesteps, conditions);
    if (conditional) {
      const int stride = 2 * n;
      std::vector<int> rows(S * std::size_t(stride), 0);
      for (std::size_t st = 0; st < S; ++st)
        for (int b = 0; b < stride; ++b) {
          const int u = b < n ? conditions.of_sample[std::size_t(b)] : guided ? conditions.null_index : 0;
          rows[st * std::size_t(stride) + std::size_t(b)] = int(st * conditions.count + std::size_t(u));
        }
      if (rows != rows_uploaded_) {
        if (in_caller_capture)
          throw Error(ErrorCode::InvalidArgument, "sample_async inside the caller's CUDA graph capture would upload new class "
                                                  "labels: make one call with the same options outside the capture first");
        if (rows_.reserve(rows.size() * sizeof(int), "the per-sample table rows")) step_graph_valid_ = false;
        DDIM_CUDA_CHECK(cudaMemcpyAsync(rows_.get(), rows.data(), rows.size() * sizeof(int), cudaMemcpyHostToDevice, stream_));
        rows_uploaded_ = std::move(rows);
      }
    }
    const float* noise = job.noise_device;
    if (!job.noise.empty()) {
      if (noise_.reserve(job.noise.size() * 4, "the caller's per-step noise")) step_graph_valid_ = false;
      DDIM_CUDA_CHECK(cudaMemcpyAsync(noise_.get(), job.noise.data(), job.noise.size() * 4, cudaMemcpyHostToDevice, stream_));
      noise = noise_.as<float>();
    }
    if (x_.reserve(NE * 4, "the sampler state")) step_graph_valid_ = false;
    float* x0_all = nullptr;
    float* trajectory = nullptr;
    if (job.want_x0) {
      if (x0_all_.reserve(S * NE * 4, "the x0 predictions")) step_graph_valid_ = false;
      x0_all = x0_all_.as<float>();
    }
    if (job.want_trajectory) {
      if (trajectory_.reserve((S + 1) * NE * 4, "the trajectory")) step_graph_valid_ = false;
      trajectory = trajectory_.as<float>();
    }

    // x_T: the caller's (NCHW, host or device) or Philox noise, kept fp32 NHWC; the forward reads
    // it rounded.
    if (job.x_T_device) {
      nchw_f32_to_nhwc(job.x_T_device, x_.get(), DType::F32, n, c, hw, stream_);
    } else if (!job.x_T.empty()) {
      staging_.reserve(NE * 4, "the host-layout staging buffer");
      DDIM_CUDA_CHECK(cudaMemcpyAsync(staging_.get(), job.x_T.data(), NE * 4, cudaMemcpyHostToDevice, stream_));
      nchw_f32_to_nhwc(staging_.as<float>(), x_.get(), DType::F32, n, c, hw, stream_);
    } else {
      philox_initial(seeds_.as<std::uint64_t>(), n, c, hw, x_.as<float>(), stream_);
    }
    convert_from_f32(x_.as<float>(), value_ptr(g_.sample), dtype_, NE, stream_);
    if (trajectory) DDIM_CUDA_CHECK(cudaMemcpyAsync(trajectory, x_.get(), NE * 4, cudaMemcpyDeviceToDevice, stream_));
    DDIM_CUDA_CHECK(cudaMemsetAsync(step_index_.get(), 0, sizeof(int), stream_));

    // Dynamic thresholding: the unclipped x0 of the step, its per-sample quantile bound, then the
    // step (every step of the job, the bound used only by steps whose clip asks for it).
    if (thresholding && threshold_buffer_.reserve(threshold_bytes, "the dynamic-thresholding buffers")) step_graph_valid_ = false;
    auto* tb = threshold_buffer_.as<unsigned char>();
    float* x0_unclipped = thresholding ? reinterpret_cast<float*>(tb) : nullptr;
    float* bounds = thresholding ? reinterpret_cast<float*>(tb + (NE * 4 + 255) / 256 * 256) : nullptr;
    void* scratch = thresholding ? tb + (NE * 4 + 255) / 256 * 256 + (std::size_t(n) * 4 + 255) / 256 * 256 : nullptr;
    StepLaunch launch{n, c, hw, params_.as<DdimStepParams>(), step_index_.as<int>(), seeds_.as<std::uint64_t>(), noise,
                      x_.as<float>(), value_ptr(g_.output), x0_all, trajectory, value_ptr(g_.sample), bounds};
    const std::size_t sample_bytes = NE * dtype_size(dtype_);
    const auto enqueue_step = [&](cudaStream_t st) {
      if (!conditional) {
        for (int v : fold_.tables) gather_rows(tables_[v].get(), step_index_.as<int>(), value_ptr(v), dtype_, n, g_.values[v].c, st);
        run_forward_ops(st);
      } else {
        const int fb = guided ? 2 * n : n;
        for (int v : fold_.tables)
          gather_rows_indexed(tables_[v].get(), rows_.as<int>(), 2 * n, step_index_.as<int>(), value_ptr(v), dtype_, fb,
                              g_.values[v].c, st);
        if (guided) {  // the null half reads the same x_t
          DDIM_CUDA_CHECK(cudaMemcpyAsync(static_cast<unsigned char*>(value_ptr(g_.sample)) + sample_bytes, value_ptr(g_.sample),
                                          sample_bytes, cudaMemcpyDeviceToDevice, st));
          run_forward_ops(st, true);
          cfg_combine(value_ptr(g_.output), dtype_, n, E, float(job.cond.guidance_scale), float(job.cond.guidance_rescale), st);
        } else {
          run_forward_ops(st);
        }
      }
      if (thresholding) {
        ddim_pred_x0_all(launch, dtype_, x0_unclipped, st);
        dynamic_thresholds(x0_unclipped, n, E, job.dynamic_thresholding_ratio, job.sample_max_value, bounds, scratch,
                           threshold_scratch, st);
      }
      ddim_step(launch, dtype_, st);
      advance_step(step_index_.as<int>(), st);
    };
    // The step graph is captured once and replayed; recaptured only when a buffer it uses moved
    // or the optional outputs changed.
    const std::vector<const void*> key{noise, x0_all, trajectory, bounds, conditional ? rows_.get() : nullptr,
                                       guided ? this : nullptr};
    const std::pair<double, double> guidance_key{job.cond.guidance_scale, job.cond.guidance_rescale};
    if (guided && guidance_key != captured_guidance_) step_graph_valid_ = false;
    const std::pair<double, double> threshold_key{job.dynamic_thresholding_ratio, job.sample_max_value};
    if (thresholding && threshold_key != captured_threshold_) step_graph_valid_ = false;
    // Whole-loop graph (SessionOptions::whole_loop_graph, without a progress callback): all S
    // steps captured into one graph, one launch per sample call; else one step, replayed S times.
    const std::size_t repeats = options_.whole_loop_graph && !job.progress && S > 0 ? S : 1;
    const auto capture = [&] {
      if (step_graph_) {
        DDIM_CUDA_CHECK(cudaGraphExecDestroy(step_graph_));
        step_graph_ = nullptr;
      }
      cudaGraph_t graph = nullptr;
      DDIM_CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
      try {
        for (std::size_t r = 0; r < repeats; ++r) enqueue_step(stream_);
      } catch (...) {
        (void)cudaStreamEndCapture(stream_, &graph);  // abandon the capture, keep the first error
        if (graph) (void)cudaGraphDestroy(graph);
        // EndCapture of an invalidated capture leaves its error as the thread's last error, which
        // the next check_launch (cudaGetLastError) would report as a failure of an unrelated kernel.
        (void)cudaGetLastError();
        throw;
      }
      DDIM_CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
      // Instantiate into a local: on failure the output handle is unspecified, and step_graph_
      // must stay null (it is destroyed and launched when non-null).
      cudaGraphExec_t exec = nullptr;
      const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
      (void)cudaGraphDestroy(graph);
      DDIM_CUDA_CHECK(inst);
      step_graph_ = exec;
      captured_with_ = key;
      captured_threshold_ = threshold_key;
      captured_guidance_ = guidance_key;
      captured_repeats_ = repeats;
      step_graph_valid_ = true;
    };
    if (!options_.profile && graph_failure_.empty() && !in_caller_capture &&
        (!step_graph_ || !step_graph_valid_ || key != captured_with_ || repeats != captured_repeats_)) {
      // A library call that cannot be captured (e.g. a cuDNN engine) must not make the session
      // unusable: after a second failed attempt the steps run eagerly, exactly the same launches
      // without the graph. The first failure is retried at once: another thread's device-wide
      // synchronisation can invalidate a capture that is otherwise fine.
      for (int attempt = 1; attempt <= 2; ++attempt) {
        try {
          capture();
          break;
        } catch (const Error& e) {
          if (e.code() == ErrorCode::DeviceLost || e.code() == ErrorCode::OutOfMemory) throw;
          if (attempt == 2) {
            graph_failure_ = e.what();
            info_.warnings.push_back("the sampling steps run eagerly: capturing them as a CUDA graph failed twice: " +
                                     graph_failure_);
          }
        }
      }
    }
    const bool eager = options_.profile || !graph_failure_.empty() || in_caller_capture;

    // The loop: no host synchronisation, allocation or copy between steps. With a progress
    // callback one event per step is recorded and the host waits on the previous step's event
    // (the device stays one step ahead), so the callback runs on the calling thread.
    cudaEvent_t done[2] = {nullptr, nullptr};
    if (job.progress)
      for (auto& e : done) DDIM_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    struct Events {
      cudaEvent_t* e;
      ~Events() {
        for (int i = 0; i < 2; ++i)
          if (e[i]) (void)cudaEventDestroy(e[i]);
      }
    } events{done};
    const auto report = [&](std::size_t finished) {
      DDIM_CUDA_CHECK(cudaEventSynchronize(done[(finished - 1) % 2]));
      if (!job.progress(int(finished), int(S))) {
        DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
        throw Error(ErrorCode::Cancelled, "sampling cancelled by the progress callback after step " + std::to_string(finished));
      }
    };
    if (!eager && repeats > 1) {
      NvtxRange loop_range("ddim.loop");
      DDIM_CUDA_CHECK(cudaGraphLaunch(step_graph_, stream_));
    }
    for (std::size_t s = 0; s < S && (eager || repeats == 1); ++s) {
      {
        NvtxRange step_range("ddim.step");
        if (eager) enqueue_step(stream_);
        else DDIM_CUDA_CHECK(cudaGraphLaunch(step_graph_, stream_));
      }
      if (job.progress) {
        DDIM_CUDA_CHECK(cudaEventRecord(done[s % 2], stream_));
        if (s >= 1) report(s);
      }
    }
    if (job.progress && S > 0) report(S);

    // Results: into the caller's device buffer (fp32, or converted to the session's precision),
    // the session's device buffer (output_on_device), or back to the host layout.
    if (job.output_device) {
      if (!job.output_session_precision || dtype_ == DType::F32) {
        nhwc_to_nchw_f32(x_.get(), static_cast<float*>(job.output_device), DType::F32, n, c, hw, stream_);
      } else {
        output_.reserve(NE * 4, "the device-side output");
        nhwc_to_nchw_f32(x_.get(), output_.as<float>(), DType::F32, n, c, hw, stream_);
        convert_from_f32(output_.as<float>(), job.output_device, dtype_, NE, stream_);
      }
    } else if (job.output_on_device) {
      output_.reserve(NE * 4, "the device-side output");
      nhwc_to_nchw_f32(x_.get(), output_.as<float>(), DType::F32, n, c, hw, stream_);
      result.device_images = output_.as<float>();
    } else {
      staging_.reserve(NE * 4, "the host-layout staging buffer");
      nhwc_to_nchw_f32(x_.get(), staging_.as<float>(), DType::F32, n, c, hw, stream_);
      result.images.resize(NE);
      DDIM_CUDA_CHECK(cudaMemcpyAsync(result.images.data(), staging_.get(), NE * 4, cudaMemcpyDeviceToHost, stream_));
    }
    if (job.async) return;  // the caller's stream carries on; nothing waits here
    // (A kept buffer, not a temporary: freeing device memory synchronises the whole device.)
    const auto fetch = [&](const DeviceBuffer& src, std::size_t slices, std::vector<float>& dst) {
      fetch_.reserve(slices * NE * 4, "the trajectory / x0 result buffer");
      nhwc_to_nchw_f32(src.get(), fetch_.as<float>(), DType::F32, int(slices) * n, c, hw, stream_);
      dst.resize(slices * NE);
      DDIM_CUDA_CHECK(cudaMemcpyAsync(dst.data(), fetch_.get(), dst.size() * 4, cudaMemcpyDeviceToHost, stream_));
      DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
    };
    if (trajectory) fetch(trajectory_, S + 1, result.trajectory);
    if (x0_all) fetch(x0_all_, S, result.x0);
    DDIM_CUDA_CHECK(cudaStreamSynchronize(stream_));
  });
}

}  // namespace ddim::cuda
