// Direct 2-D convolution, the reference and fallback for shapes cuDNN does not take:
//   y[b, oy, ox, co] = bias[co] + sum_{ky, kx, ci} w[co, ky, kx, ci] * x[b, oy*sh - pad_t + ky, ox*sw - pad_l + kx, ci]
// x (n, h, w, cin) and y (n, oh, ow, cout) NHWC, w (cout, kh, kw, cin) KRSC, all of T (float,
// __half, __nv_bfloat16); bias (cout) fp32 or null. Input positions outside the image are zero
// (the padding may differ on each side). Products and sums are fp32 FMAs (no TF32, no tensor
// cores); each output is one chain over k = (ky * kw + kx) * cin + ci in increasing order, then
// + bias, rounded once to T. The order is fixed by the code, so results never depend on the batch.
//
// It is an implicit GEMM on CUDA cores: C (M = n*oh*ow output pixels, N = cout) = A (M, K) * W^T,
// K = kh*kw*cin, where row m of A is output pixel m's receptive field in KRSC order (gathered on
// the fly, zeros for the padding) and row co of W is filter co, contiguous in memory. A block
// computes a 64 x 64 tile of C with 256 threads: for each slice of 16 k it stages A (64 x 16) and
// W (64 x 16) in shared memory as fp32 (converted on load), then each thread accumulates a 4 x 4
// micro-tile, pixels ty + 16i and channels tx + 16j (strided, so a warp's shared-memory reads of W
// are 16 consecutive floats and its stores of y are 16 consecutive channels).
//   Loads: thread t stages k = k0 + t % 16 for the rows t / 16 + 16i, i < 4; consecutive threads
// read consecutive k, i.e. consecutive input channels of one pixel (or consecutive weights of one
// filter), so global reads are contiguous runs of 16 elements. Each thread decodes its 4 pixels
// once, and its k into (ky, kx, ci) once per slice.
// Grid: (ceil(M / 64), ceil(cout / 64)); shared memory: 2 * 16 * 65 floats (8.3 KiB).
#include <cstddef>
#include <string>

#include "cuda/check.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {
namespace {

constexpr int kBM = 64;  // output pixels per block
constexpr int kBN = 64;  // output channels per block
constexpr int kBK = 16;  // reduction slice
constexpr int kTM = 4;   // pixels per thread
constexpr int kTN = 4;   // channels per thread
constexpr int kThreads = (kBM / kTM) * (kBN / kTN);  // 256
constexpr int kLoadRows = kThreads / kBK;            // 16 rows staged per pass of the block
static_assert(kBM == kLoadRows * kTM && kBN == kLoadRows * kTN, "each thread stages kTM rows of A and kTN of W");
static_assert(kBN / kTN == 16 && kBM / kTM == 16, "the micro-tile strides below assume a 16 x 16 thread grid");

struct ConvArgs {
  int n, h, w, cin, cout, kw;
  int sh, sw, pad_t, pad_l;
  int oh, ow;
  int K;        // kh * kw * cin
  long long M;  // n * oh * ow
};

template <class T>
__global__ void __launch_bounds__(kThreads)
    conv2d_direct_kernel(ConvArgs a, const T* __restrict__ x, const T* __restrict__ wt, const float* __restrict__ bias,
                         T* __restrict__ y) {
  __shared__ float As[kBK][kBM + 1];  // As[k][m]: the input value k of output pixel m0 + m
  __shared__ float Ws[kBK][kBN + 1];  // Ws[k][j]: weight k of output channel n0 + j
  const int tid = int(threadIdx.x);
  const long long m0 = static_cast<long long>(blockIdx.x) * kBM;
  const int n0 = int(blockIdx.y) * kBN;

  // Staging role: slice offset lk, rows lr + 16i.
  const int lk = tid % kBK, lr = tid / kBK;
  long long pbase[kTM];  // (b * h) of the pixel, or -1 past the last pixel
  int piy[kTM], pix[kTM];  // top-left input position of its receptive field
#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const long long m = m0 + lr + kLoadRows * i;
    pbase[i] = -1;
    piy[i] = pix[i] = 0;
    if (m < a.M) {
      const int ox = int(m % a.ow);
      const long long r = m / a.ow;
      const int oy = int(r % a.oh);
      pbase[i] = (r / a.oh) * a.h;
      piy[i] = oy * a.sh - a.pad_t;
      pix[i] = ox * a.sw - a.pad_l;
    }
  }

  // Compute role: pixels ty + 16i, channels tx + 16j.
  const int tx = tid % 16, ty = tid / 16;
  float acc[kTM][kTN];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTN; ++j) acc[i][j] = 0.0f;

  for (int k0 = 0; k0 < a.K; k0 += kBK) {
    const int k = k0 + lk;
    const bool kv = k < a.K;
    const int ci = kv ? k % a.cin : 0;
    const int r = kv ? k / a.cin : 0;
    const int kx = r % a.kw, ky = r / a.kw;
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      float v = 0.0f;
      const int iy = piy[i] + ky, ix = pix[i] + kx;
      if (kv && pbase[i] >= 0 && iy >= 0 && iy < a.h && ix >= 0 && ix < a.w)
        v = to_f32(x[(std::size_t(pbase[i] + iy) * std::size_t(a.w) + std::size_t(ix)) * std::size_t(a.cin) +
                     std::size_t(ci)]);
      As[lk][lr + kLoadRows * i] = v;
    }
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int co = n0 + lr + kLoadRows * j;
      Ws[lk][lr + kLoadRows * j] = kv && co < a.cout ? to_f32(wt[std::size_t(co) * std::size_t(a.K) + std::size_t(k)]) : 0.0f;
    }
    __syncthreads();
    // Slices past K hold zeros: their FMAs add +0 to each chain and change nothing (x + 0 = x).
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[kTM], wv[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kTN; ++j) wv[j] = Ws[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(av[i], wv[j], acc[i][j]);
    }
    __syncthreads();  // before the next slice overwrites As and Ws
  }

#pragma unroll
  for (int i = 0; i < kTM; ++i) {
    const long long m = m0 + ty + 16 * i;
    if (m >= a.M) continue;
#pragma unroll
    for (int j = 0; j < kTN; ++j) {
      const int co = n0 + tx + 16 * j;
      if (co < a.cout)
        y[std::size_t(m) * std::size_t(a.cout) + std::size_t(co)] = from_f32<T>(bias ? acc[i][j] + bias[co] : acc[i][j]);
    }
  }
}

[[noreturn]] void invalid(const ConvShape& s, const std::string& what) {
  throw Error(ErrorCode::InvalidArgument,
              "cuda conv2d_direct (n=" + std::to_string(s.n) + " " + std::to_string(s.h) + "x" + std::to_string(s.w) +
                  "x" + std::to_string(s.cin) + " -> " + std::to_string(s.cout) + ", " + std::to_string(s.kh) + "x" +
                  std::to_string(s.kw) + "): " + what);
}

}  // namespace

void conv2d_direct(const ConvShape& s, const void* x, const void* weight, const float* bias, void* y, DType t,
                   cudaStream_t stream) {
  if (s.n < 0 || s.h <= 0 || s.w <= 0 || s.cin <= 0 || s.cout <= 0 || s.kh <= 0 || s.kw <= 0)
    invalid(s, "every dimension must be positive (n >= 0)");
  if (s.stride_h <= 0 || s.stride_w <= 0) invalid(s, "strides must be positive");
  if (s.pad_t < 0 || s.pad_b < 0 || s.pad_l < 0 || s.pad_r < 0) invalid(s, "padding must be >= 0");
  if (s.h + s.pad_t + s.pad_b < s.kh || s.w + s.pad_l + s.pad_r < s.kw)
    invalid(s, "the kernel is larger than the padded input");
  const long long K = static_cast<long long>(s.kh) * s.kw * s.cin;
  if (K > 0x7fffffffLL - kBK) invalid(s, "kh * kw * cin is too large");
  const int oh = s.out_h(), ow = s.out_w();
  const long long M = static_cast<long long>(s.n) * oh * ow;
  if (M == 0) return;
  if (!x || !weight || !y) invalid(s, "x, weight or y is null");
  const long long grid_x = (M + kBM - 1) / kBM, grid_y = (s.cout + kBN - 1) / kBN;
  if (grid_x > 0x7fffffffLL || grid_y > 65535) invalid(s, "too many output pixels or channels for one launch");
  ConvArgs a{s.n, s.h, s.w, s.cin, s.cout, s.kw, s.stride_h, s.stride_w, s.pad_t, s.pad_l, oh, ow, int(K), M};
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    DDIM_LAUNCH(dim3(unsigned(grid_x), unsigned(grid_y)), kThreads, 0, stream, conv2d_direct_kernel<T>)(
        a, static_cast<const T*>(x), static_cast<const T*>(weight), bias, static_cast<T*>(y));
  });
  check_launch("conv2d_direct");
}

}  // namespace ddim::cuda
