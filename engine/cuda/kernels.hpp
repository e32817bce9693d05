#pragma once
// Launchers of the CUDA backend's hand-written kernels (kernels/*.cu). Host-callable, no device
// code here; every launcher enqueues on `stream`, never synchronises, never allocates, and checks
// its launch (cudaGetLastError) by throwing ddim::Error (ErrorCode::Device) naming the kernel.
//
// Layout: activations are NHWC on the device, (n, hw, c) with c innermost; "vector" values (the
// time tables) are (n, c). Element type `DType` for activations and conv/linear weights;
// per-channel affine parameters (GroupNorm gamma/beta) and biases are always fp32. Every
// reduction and every product accumulates in fp32; a result is rounded once to the element type.
// fp32 kernels never use TF32.
//
// Each op has a CPU twin in engine/cpu/ops.hpp (NCHW, fp32); tests/cuda/test_cuda_ops.cpp compares
// them at real U-Net shapes. Pointers are device pointers unless stated.
#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "kernels/ddim_step.h"

namespace ddim::cuda {

enum class DType { F32, F16, BF16 };
std::size_t dtype_size(DType t) noexcept;  // 4, 2, 2
const char* to_string(DType t) noexcept;   // "fp32", "fp16", "bf16"

// ---- layout and type conversion (the boundary with the host's NCHW fp32)
// y (n, hw, c) of type t <- x (n, c, hw) fp32.
void nchw_f32_to_nhwc(const float* x, void* y, DType t, int n, int c, int hw, cudaStream_t stream);
// y (n, c, hw) fp32 <- x (n, hw, c) of type t.
void nhwc_to_nchw_f32(const void* x, float* y, DType t, int n, int c, int hw, cudaStream_t stream);
// y[i] = float(x[i]) converted to type t (count elements; y may be x only when t is F32).
void convert_from_f32(const float* x, void* y, DType t, std::size_t count, cudaStream_t stream);

// ---- elementwise, NHWC
void silu(const void* x, void* y, DType t, std::size_t count, cudaStream_t stream);
// y = (a + b) / divisor, same shape.
void add(const void* a, const void* b, void* y, DType t, std::size_t count, float divisor, cudaStream_t stream);
// y (n, hw, c) = (a (n, hw, c) + b (n, c) broadcast over hw) / divisor.
void add_broadcast(const void* a, const void* b, void* y, DType t, int n, int hw, int c, float divisor,
                   cudaStream_t stream);
// y = x * scale + shift
void scale_shift(const void* x, void* y, DType t, std::size_t count, float scale, float shift, cudaStream_t stream);
// y (n, hw, sum c_i) = channel concatenation of x_i (n, hw, c_i), i < count <= kMaxConcat.
constexpr int kMaxConcat = 8;
void concat_channels(const void* const* xs, const int* cs, int count, void* y, DType t, int n, int hw,
                     cudaStream_t stream);  // xs, cs: host arrays of device pointers / channel counts
// y (n, 2h, 2w, c) nearest neighbour.
void upsample_nearest2x(const void* x, void* y, DType t, int n, int h, int w, int c, cudaStream_t stream);
// y (n, h/2, w/2, c): mean of each 2x2 window (h, w even).
void avg_pool2x(const void* x, void* y, DType t, int n, int h, int w, int c, cudaStream_t stream);

// ---- Vector quantisation (kernels/vector_quantize.cu): every pixel of x (n, hw, c) replaced by
// the nearest entry of the fp32 codebook (entries, c), ties to the lowest index; indices (n, hw)
// receives the entry numbers when not null. y may be x. c <= kMaxVqChannels (else Unsupported).
inline constexpr int kMaxVqChannels = 64;
void vector_quantize(const void* x, void* y, int* indices, DType t, int n, int hw, int c, const float* codebook, int entries,
                     cudaStream_t stream);

// ---- GroupNorm (+ SiLU), NHWC: statistics per (sample, group) over hw x (c / groups) values in
// fp32 (two passes: mean, then the centred sum of squares; no E[x^2] - E[x]^2 cancellation),
// affine per channel with fp32 gamma / beta, then SiLU when `silu`.
void group_norm(const void* x, void* y, DType t, int n, int hw, int c, int groups, float eps, const float* gamma,
                const float* beta, bool silu, cudaStream_t stream);

// ---- Direct convolution, NHWC input, KRSC weight (cout, kh, kw, cin), fp32 bias (may be null),
// fp32 accumulation: the simple reference / fallback for shapes cuDNN is not used for.
struct ConvShape {
  int n, h, w, cin;          // input (n, h, w, cin)
  int cout, kh, kw;          // weight (cout, kh, kw, cin)
  int stride_h, stride_w;
  int pad_t, pad_b, pad_l, pad_r;
  int out_h() const { return (h + pad_t + pad_b - kh) / stride_h + 1; }
  int out_w() const { return (w + pad_l + pad_r - kw) / stride_w + 1; }
};
void conv2d_direct(const ConvShape& s, const void* x, const void* weight, const float* bias, void* y, DType t,
                   cudaStream_t stream);

// ---- Attention core, flash style (online softmax; the N x N scores never reach global memory).
// For each sample b and head h: o[b, i, h*D : (h+1)*D] = sum_j softmax_j(scale * q_i . k_j) v_j,
// where q_i = q[b, i, h*D : (h+1)*D] (row i of a (n, tokens, ld) matrix), k and v alike.
// ld_q / ld_k / ld_v / ld_o are row strides in elements (a fused qkv buffer: ld = 3d and the
// pointers offset by 0, d, 2d). head_dim <= kMaxHeadDim, any tokens >= 1.
constexpr int kMaxHeadDim = 512;
struct AttentionShape {
  int n, tokens, heads, head_dim;
  int ld_q, ld_k, ld_v, ld_o;
  float scale;
};
void attention(const AttentionShape& s, const void* q, const void* k, const void* v, void* o, DType t,
               cudaStream_t stream);

// ---- The sampler's per-step kernels. The sampler's state x is fp32 NHWC (n, hw, c) on the
// device; noise is indexed by the host's NCHW element index e = ch * hw + p, so every value equals
// the CPU's (kernels/philox.h: a value depends on (seed, stream, step, e) only).
// Initial noise: x[b, p, ch] = philox_normal(seeds[b], kNoiseStreamInitial, 0, ch * hw + p).
void philox_initial(const std::uint64_t* seeds, int n, int c, int hw, float* x, cudaStream_t stream);
// One DDIM / DDPM step of the whole batch, in place on x, from the model output `out` (n, hw, c)
// of type t. The step index is read from device memory (*step_index) so that one captured graph
// serves every step: params[*step_index] are the step's parameters; its noise (when sigma > 0) is
// philox_normal(seeds[b], kNoiseStreamStep, *step_index, e), or noise[(*step_index * n + b) *
// c * hw + e] (NCHW, as the caller gave it) when `noise` is not null. When not null, x0_all
// (S, n, hw, c) fp32 receives the clipped x0 prediction in slice *step_index and trajectory
// (S + 1, n, hw, c) the new x in slice *step_index + 1; next_input (n, hw, c) of type t receives
// the new x rounded for the next forward. The arithmetic is kernels/ddim_step.h and
// kernels/ddpm_step.h, the same functions the CPU runs. Dynamic thresholding (clip ==
// kClipThreshold) divides by thresholds[b], the per-sample bound computed beforehand from
// ddim_pred_x0_all's output (cuda/threshold.hpp); thresholds may be null for steps without it.
struct StepLaunch {
  int n, c, hw;
  const DdimStepParams* params;  // device array, one per step
  const int* step_index;         // device scalar
  const std::uint64_t* seeds;    // device array of n
  const float* noise;            // optional device (S, n, c, hw)
  float* x;                      // (n, hw, c) fp32, updated in place
  const void* out;               // model output (n, hw, c) of type t
  float* x0_all;                 // optional (S, n, hw, c) fp32
  float* trajectory;             // optional (S + 1, n, hw, c) fp32
  void* next_input;              // optional (n, hw, c) of type t
  const float* thresholds;       // optional (n): dynamic-thresholding bounds of this step
};
void ddim_step(const StepLaunch& s, DType t, cudaStream_t stream);
// x0 (n, hw, c) fp32 = the unclipped x0 prediction of this step (params[*step_index]), the input
// of the dynamic-thresholding quantile.
void ddim_pred_x0_all(const StepLaunch& s, DType t, float* x0, cudaStream_t stream);
// Loads every kernel one sampling step launches for element type t (gather_rows, ddim_step,
// ddim_pred_x0_all, advance_step, the dynamic-thresholding kernels) with cudaFuncGetAttributes,
// so that none is launched for the first time inside a stream capture (CUDA's lazy loading would
// load its module there). Synchronous; call before capturing.
void load_sampling_kernels(DType t);
// *step_index += 1 (one thread, so that a graph replay advances the step on the device).
void advance_step(int* step_index, cudaStream_t stream);
// dst[0 .. bytes) = src[0 .. bytes) from host memory, carried in kernel parameters (chunks of
// kInlineCopyBytes, one launch each): a truly asynchronous upload of small per-call data (step
// parameters, seeds) with no pinned staging and no host synchronisation; src may be reused as
// soon as this returns.
constexpr std::size_t kInlineCopyBytes = 2048;
void copy_from_host_inline(void* dst, const void* src, std::size_t bytes, cudaStream_t stream);
// y (rows, cols) of type t = (y + bias[col]) / divisor; bias fp32 (may be null: divide only).
void bias_divide_rows(void* y, DType t, std::size_t rows, int cols, const float* bias, float divisor, cudaStream_t stream);
// The folded time tables (one row per step, graph/passes.hpp) feed each step's forward:
// y[b, :] = table[*step_index, :] for every sample b < n; table (S, c), y (n, c), both of type t.
void gather_rows(const void* table, const int* step_index, void* y, DType t, int n, int c, cudaStream_t stream);
// Class-conditional models: y (n, c) = table rows rows[*step_index * stride + b] (b < n); rows
// (S, stride) int32, table (rows, c) of type t.
void gather_rows_indexed(const void* table, const int* rows, int stride, const int* step_index, void* y, DType t, int n,
                         int c, cudaStream_t stream);
// Classifier-free guidance (kernels/cfg.h): out (2n, e) of type t holds the conditional outputs
// (samples 0..n-1) and the null outputs (n..2n-1); samples 0..n-1 become u + w (c - u), then with
// rescale > 0 diffusers' rescale_noise_cfg (unbiased std over each sample's e values, accumulated
// in double; ratio 1 for a guided output with zero spread or e < 2). One block per sample.
void cfg_combine(void* out, DType t, int n, std::size_t e, float scale, float rescale, cudaStream_t stream);
// Loads the two kernels above for element type t (load_sampling_kernels calls it).
void load_guidance_kernels(DType t);

}  // namespace ddim::cuda
