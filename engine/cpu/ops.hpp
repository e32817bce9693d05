#pragma once
// CPU kernels, fp32 data, NCHW (PyTorch's layout), batch-independent arithmetic: the result for
// one sample never depends on the batch size, on the sample's position in the batch or on the
// thread count. The convolution and attention products run on the GEMM core (gemm_core.hpp) in
// fp32, or with bf16 operands when their weights were packed for a bf16 kernel.
// Shapes in comments: x: (N, C, H, W). `pool` may be null (single-threaded).
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/gemm_core.hpp"

namespace ddim::cpu {

class ThreadPool;

// C[M,N] (+)= A[M,K] * B[K,N]; row-major with leading dimensions. accumulate: add to C.
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc,
          bool accumulate, ThreadPool* pool);

// The fp32 gemm micro-kernel of the plain entry points (gemm, conv2d, attention; a session picks
// its own at plan time, engine/cpu/isa.hpp). Auto (the default) takes the level active_isa()
// gives: the CPU's best, narrowed by DDIM_CPU_ISA. Every kernel computes each element as one
// chain over k = 0..K-1 in order (Avx2Fma and Avx512: fused multiply-add, so they agree bitwise;
// Portable: multiply then add), so results never depend on M, N, tiling or thread count.
// gemm_select_kernel is for tests and benchmarks (process-wide; not to be called while a gemm
// runs); it returns false, changing nothing, when the CPU lacks the kernel's instructions or
// DDIM_CPU_ISA excludes them.
enum class GemmKernel { Auto, Portable, Avx2Fma, Avx512 };
bool gemm_select_kernel(GemmKernel kernel);
const char* gemm_kernel_name() noexcept;  // the kernel gemm uses now, e.g. "avx512 8x32"

struct Conv2dShape {
  int n, cin, h, w;       // input
  int cout, kh, kw;       // weight (cout, cin, kh, kw)
  int stride_h, stride_w;
  int pad_t, pad_b, pad_l, pad_r;  // zero padding
  int out_h() const { return (h + pad_t + pad_b - kh) / stride_h + 1; }
  int out_w() const { return (w + pad_l + pad_r - kw) / stride_w + 1; }
};
// y: (n, cout, out_h, out_w) = conv(x) + bias (bias may be null), the weight packed per call for
// the process-wide kernel (gemm_select_kernel). No scratch: the im2col matrix is never stored.
void conv2d(const Conv2dShape& s, const float* x, const float* weight, const float* bias, float* y, ThreadPool* pool);

// The epilogue of a convolution (each term may be null): y = ((conv + bias) + temb) + residual,
// the order of the separate bias, time-embedding and residual adds it replaces (so the result is
// bitwise theirs). temb: (n, cout), broadcast over the pixels; residual: like y, not aliasing it.
struct ConvEpilogue {
  const float* bias = nullptr;
  const float* temb = nullptr;
  const float* residual = nullptr;
};
// The weight (cout, cin, kh, kw) packed once for `spec` (a session does this at plan time).
void pack_conv_weights(const Conv2dShape& s, const float* weight, const KernelSpec& spec, PackedA& out,
                       ThreadPool* pool);
void conv2d_packed(const Conv2dShape& s, const float* x, const PackedA& weight, const ConvEpilogue& e, float* y,
                   ThreadPool* pool);

// y: (n, out) = x (n, in) * W^T + b; weight (out, in) as PyTorch's Linear; bias may be null.
void linear(const float* x, int n, int in, const float* weight, const float* bias, int out, float* y, ThreadPool* pool);

// GroupNorm over (C/groups, HW) per sample and group; affine per channel; then SiLU if silu.
void group_norm(const float* x, int n, int c, int hw, int groups, float eps, const float* gamma, const float* beta,
                bool silu, float* y, ThreadPool* pool);

// The element-wise and data-movement ops split their work over `pool` when given one.
void silu(const float* x, std::size_t count, float* y, ThreadPool* pool = nullptr);
// y = (a + b) / divisor, same shape.
void add(const float* a, const float* b, std::size_t count, float divisor, float* y, ThreadPool* pool = nullptr);
// y (n, c, hw) = (a (n, c, hw) + b (n, c) broadcast over hw) / divisor.
void add_broadcast(const float* a, const float* b, int n, int c, int hw, float divisor, float* y,
                   ThreadPool* pool = nullptr);
// y = x * scale + shift
void scale_shift(const float* x, std::size_t count, float scale, float shift, float* y, ThreadPool* pool = nullptr);
// y (n, sum(c_i), hw): channel concatenation of `count` inputs x_i (n, c_i, hw).
void concat_channels(const float* const* xs, const int* cs, int count, int n, int hw, float* y,
                     ThreadPool* pool = nullptr);
// y (n, c, 2h, 2w)
void upsample_nearest2x(const float* x, int n, int c, int h, int w, float* y, ThreadPool* pool = nullptr);
// y (n, c, h/2, w/2): mean of each 2x2 window (h, w even)
void avg_pool2x(const float* x, int n, int c, int h, int w, float* y, ThreadPool* pool = nullptr);

// Spatial self-attention as diffusers' Attention on (n, hw, c) tokens and the original DDPM
// AttnBlock: q = Wq x + bq, k, v likewise (weights (d, c), d = heads * head_dim), per head
// softmax(q k^T * scale) v, out = Wo o + bo (Wo: (c, d)), then y = (out + residual) / rescale
// (residual may be null: no residual connection). x_normed, residual, y: (n, c, hw); y must not
// alias residual.
struct AttentionWeights {
  const float *wq, *bq, *wk, *bk, *wv, *bv, *wo, *bo;  // biases may be null
};
std::size_t attention_scratch_floats(int n, int c, int hw, int d, ThreadPool* pool);
// Packs the weights per call for the process-wide kernel.
void attention(const float* x_normed, const float* residual, int n, int c, int hw, int d, int heads, float scale,
               const AttentionWeights& w, float rescale, float* y, float* scratch, ThreadPool* pool);
// The weights packed once for `spec` (whose precision the score and value products use too).
struct PackedAttention {
  PackedA qkv;                  // [Wq; Wk; Wv] (3d, c)
  std::vector<float> qkv_bias;  // (3d), empty: none
  PackedA out;                  // Wo (c, d)
  const float* bo = nullptr;
  const KernelSpec* spec = nullptr;
};
void pack_attention(const AttentionWeights& w, int c, int d, const KernelSpec& spec, PackedAttention& out,
                    ThreadPool* pool);
void attention_packed(const float* x_normed, const float* residual, int n, int c, int hw, int d, int heads, float scale,
                      const PackedAttention& w, float rescale, float* y, float* scratch, ThreadPool* pool);

// Vector quantisation (diffusers' VectorQuantizer in VQModel.decode): every pixel of x (n, c, hw)
// replaced by the codebook entry (entries, c) nearest to it by squared Euclidean distance, ties to
// the lowest index (kernels/vector_quantize.h). indices (n, hw) may be null. y may alias x.
void vector_quantize(const float* x, int n, int c, int hw, const float* codebook, int entries, float* y, int* indices,
                     ThreadPool* pool = nullptr);

// Sinusoidal timestep embedding exactly as diffusers' get_timestep_embedding, in float32:
// half = dim/2, exponent_i = -ln(max_period) * i / (half - freq_shift), freq_i = exp(exponent_i),
// arg = scale * t * freq_i; [sin, cos] (or [cos, sin] with flip_sin_to_cos); zero pad odd dim.
// t: (n) float timesteps; y: (n, dim).
void timestep_embedding(const float* t, int n, int dim, bool flip_sin_to_cos, float freq_shift, float max_period,
                        float scale, float* y);

}  // namespace ddim::cpu
