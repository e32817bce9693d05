#pragma once
// Convolutions through cuDNN's backend (graph) API, with the resnet epilogue fused:
//
//   y (n, oh, ow, k) = conv(x (n, h, w, c), w (k, kh, kw, c)) [+ bias[k]] [+ temb[n, k]] [+ residual[n, oh, ow, k]]
//
// x, w, y, temb and residual are of the activation type (fp32 / fp16 / bf16), bias is fp32; NHWC
// activations, KRSC weights; cross-correlation, dilation 1, any stride and asymmetric padding;
// fp32 accumulation. A CudnnConv is built once per (shape, type, epilogue) at plan time:
//
//   * the operation graph: conv -> ADD bias -> ADD temb -> ADD residual, the adds the epilogue
//     asks for, intermediate tensors virtual fp32, the output of the activation type;
//   * engines: the configs of heuristics mode A, else of mode FALLBACK, else (neither proposes
//     one that builds) of every engine of the graph by global index with default knobs, tried in
//     order until an execution plan finalizes (or, autotuning, each finalizable one timed and
//     the fastest kept). Rejected: engines that reduce in reduced precision, are
//     non-deterministic or use FFT / Winograd transforms, and for fp32 engines with
//     tensor-core / down-converting numerics (no TF32: fp32 must match the CPU fp32 reference);
//   * when no engine takes the whole epilogue, the graph keeps the longest prefix of the adds
//     that an engine takes (down to the bare convolution) and run() applies the rest with the
//     conv_epilogue kernel (fused() is then false). When not even the bare convolution has an
//     engine the constructor throws ddim::Error(ErrorCode::Unsupported) naming the shape: the
//     caller falls back to conv2d_direct.
//
// run() neither allocates device memory nor synchronises, so it can be captured in a CUDA graph.
// Every failure is a ddim::Error whose message names the convolution.
#include <cuda_runtime_api.h>

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "cuda/kernels.hpp"

// cudnnHandle_t as cudnn_graph.h declares it, so that this header does not need cuDNN's include
// path (a redeclaration of the same typedef is valid C++).
struct cudnnContext;
typedef struct cudnnContext* cudnnHandle_t;

namespace ddim::cuda {

// Which adds follow the convolution (in this order).
struct ConvEpilogue {
  bool bias = true;           // + bias[k], fp32
  bool time_add = false;      // + temb[n, k], activation type (the resnet's time projection)
  bool residual_add = false;  // + residual[n, oh, ow, k], activation type
};

// "conv 3x3 n2 16x16x128 -> 16x16x256 stride 1x1 pad t1 b1 l1 r1 fp16 + bias + temb": names a
// convolution in messages.
std::string describe(const ConvShape& s, DType t, const ConvEpilogue& e);

// An owned cuDNN handle (cudnnCreate / cudnnDestroy); creation failure is a ddim::Error.
class CudnnHandle {
 public:
  CudnnHandle();
  ~CudnnHandle();
  CudnnHandle(const CudnnHandle&) = delete;
  CudnnHandle& operator=(const CudnnHandle&) = delete;
  cudnnHandle_t get() const noexcept { return handle_; }

 private:
  cudnnHandle_t handle_ = nullptr;
};

class CudnnConv {
 public:
  // Builds the plan on the device of `handle` (the calling thread's current device). autotune:
  // times every finalizable engine config on temporary device buffers (allocated and freed
  // here, on the handle's current stream, synchronously) and keeps the fastest.
  // Throws ddim::Error: InvalidArgument (a shape that is not a valid convolution), Unsupported
  // (no cuDNN engine for even the bare convolution), OutOfMemory, DeviceLost, Internal.
  CudnnConv(cudnnHandle_t handle, const ConvShape& shape, DType dtype, const ConvEpilogue& epilogue,
            bool autotune = false);
  ~CudnnConv();
  CudnnConv(const CudnnConv&) = delete;
  CudnnConv& operator=(const CudnnConv&) = delete;

  // Enqueues y = conv(x, w) + epilogue on `stream` (cudnnSetStream(handle, stream), then
  // cudnnBackendExecute, then the conv_epilogue kernel when part of the epilogue is not fused).
  // x (n, h, w, cin), w (cout, kh, kw, cin), y (n, oh, ow, cout), temb (n, cout), residual
  // (n, oh, ow, cout) of the activation type, bias (cout) fp32; the parts the epilogue does not
  // use may be null (they are ignored). Every used pointer 16-byte aligned; y must not be x,
  // temb or residual. workspace: at least workspace_bytes() bytes (may be null when that is 0).
  // `handle` must be on the plan's device (e.g. the handle it was built with).
  void run(cudnnHandle_t handle, const void* x, const void* w, const float* bias, const void* temb, const void* residual,
           void* y, void* workspace, cudaStream_t stream) const;

  std::size_t workspace_bytes() const noexcept;
  bool fused() const noexcept;       // the whole epilogue runs inside the cuDNN plan
  int fused_adds() const noexcept;   // how many of the epilogue's adds the plan does (a prefix)
  // e.g. "engine 12 (fused conv+bias+temb+residual; runtime compiled, tensor cores; heuristics
  // mode A, config 1 of 4; workspace 0 B)"
  const std::string& engine_description() const noexcept;
  const ConvShape& shape() const noexcept;
  DType dtype() const noexcept;
  const ConvEpilogue& epilogue() const noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The convolution plans of one device, built on first use and kept; shared by every session on
// the device (a session keeps the plans it uses alive), so only the first session plans each
// shape (runtime-compiled engines compile once per process, not once per session). Plans are
// built under the cache's lock with the cache's own cuDNN handle and stream (never a session's:
// a plan must not outlive the handle it was built with) and executed with each session's handle.
// An Unsupported failure is remembered: asking again rethrows it without a rebuild. Thread-safe.
//
// for_device(d): the process-wide cache of device d (made on first use, never destroyed), or a
// new private one when the environment sets DDIM_CUDNN_PLAN_CACHE=0 (every session then plans
// its own convolutions: the way to measure plan time with and without the cache).
class ConvPlanCache {
 public:
  static std::shared_ptr<ConvPlanCache> for_device(int device);
  // A private cache on `device` (the calling thread's current device must be `device`).
  explicit ConvPlanCache(int device);
  ~ConvPlanCache();
  ConvPlanCache(const ConvPlanCache&) = delete;
  ConvPlanCache& operator=(const ConvPlanCache&) = delete;

  std::shared_ptr<const CudnnConv> get(const ConvShape& shape, DType dtype, const ConvEpilogue& epilogue, bool autotune = false);
  std::size_t size() const;                // plans built (not failures)
  std::size_t max_workspace_bytes() const;  // over the plans built
  int device() const noexcept { return device_; }
  bool shared() const noexcept { return shared_; }

 private:
  using Key = std::tuple<int, int, int, int, int, int, int, int, int, int, int, int, int,  // the ConvShape
                         int, bool, bool, bool, bool>;  // dtype, bias, time_add, residual_add, autotune
  static Key key_of(const ConvShape& s, DType t, const ConvEpilogue& e, bool autotune);
  int device_;
  bool shared_ = false;
  cudnnHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  mutable std::mutex mutex_;
  std::map<Key, std::shared_ptr<const CudnnConv>> plans_;
  std::map<Key, std::string> unsupported_;  // the Unsupported message of keys that failed
};

// The epilogue kernel (kernels/conv_epilogue.cu), for convolutions whose epilogue cuDNN did not
// fuse and for the direct convolution: in place on y (n, hw, k) NHWC of type t,
//   y = round_t(float(y) + bias[ch] + float(temb[b, ch]) + float(residual[b, p, ch]))
// in fp32, in that order, one pass, rounded once. bias fp32 (k), temb (n, k) and residual
// (n, hw, k) of type t; each may be null (skipped). Nothing is launched when all three are null.
void conv_epilogue(void* y, DType t, int n, int hw, int k, const float* bias, const void* temb, const void* residual,
                   cudaStream_t stream);

}  // namespace ddim::cuda
