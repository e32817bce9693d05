// GroupNorm (+ SiLU) on NHWC activations: x, y (n, hw, c) of T (float, __half, __nv_bfloat16),
// `groups` groups of cpg = c / groups consecutive channels; gamma, beta (c) fp32 (null: 1 and 0).
//
// Per (sample b, group g), over its N = hw * cpg values, in fp32:
//   mean = sum(x) / N                                  (pass 1)
//   var  = sum((x - mean)^2) / N   (biased, as PyTorch) (pass 2: centred, so no E[x^2] - E[x]^2
//                                                       cancellation)
//   y    = ((x - mean) * rstd) * gamma[ch] + beta[ch],  rstd = 1 / sqrt(var + eps)   (pass 3)
//   y    = y / (1 + exp(-y))  when `silu`
// rounded once to T. rstd is 1 / sqrtf (both correctly rounded) rather than rsqrtf (2 ulp), so it
// is as close as fp32 allows to the CPU's (engine/cpu/group_norm.cpp, statistics in double).
//
// Strategy: one block per (sample, group), grid n * groups. No workspace may be allocated (the
// launcher interface forbids it), and a cross-block split (thread-block clusters, or a cooperative
// grid sync) would tie the kernel to sm_90 or to co-residency limits; one block per group is simple
// and deterministic. The block reads the group three times (two statistics passes and the output
// pass). Passes 2 and 3 hit L2 (50 MiB on an H100) while the groups in flight fit there: a group
// is hw * cpg elements (32 KiB in fp16 at 64x64 x 128 channels, 512 KiB at 256x256), and up to
// 2 blocks of 1024 threads per SM are resident, so only the largest images at large batch spill
// to DRAM. The price of the simplicity is parallelism: n * groups blocks (64 at batch 2, 32
// groups) leave SMs idle for small batches; a cluster split of each group (sm_90 distributed
// shared memory) is the next step if GroupNorm shows up in the profile.
//   Block size: 1024 threads for groups of >= 64K elements (256x256 and 128x128 at cpg >= 4),
// 512 from 8K, else 256; always a multiple of 32. It depends on the shape only, so the summation
// order, hence the result, never depends on the batch size or on a sample's position in it.
//   Access pattern: the group's channels of one pixel are cpg consecutive elements; they are read
// as q = cpg / P packs of P elements (P = the widest power of two <= 16 bytes dividing cpg with the
// pointers aligned to it). Threads are laid out tq = min(q, blockDim) across the packs of a pixel
// and tp = blockDim / tq across pixels: consecutive threads read consecutive packs, then the next
// pixel's, which is as contiguous as NHWC allows (pixels are c elements apart). When q >
// blockDim, each thread also strides over the packs of its pixel. The (at most tq - 1) threads
// past tq * tp idle in the loops and join the reductions with 0.
//   Reductions: each thread sums its values sequentially (fp32), then a warp butterfly
// (__shfl_xor_sync) and a second warp over the per-warp partials in shared memory.
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/check.hpp"
#include "kernels/dtype.cuh"
#include "kernels/launch.cuh"

namespace ddim::cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kMaxThreads = 1024;

template <class T, int P>
struct alignas(sizeof(T) * P) Pack {
  T v[P];
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread. red: 33 floats of shared memory. Two barriers; a following call may reuse red at once
// (its writes to red[0..31] come after this call's second barrier, by which warp 0 has read them,
// and its write of red[32] after its own first barrier, by which every thread has read red[32]).
__device__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? red[lane] : 0.0f;
    s = warp_sum(s);
    if (lane == 0) red[32] = s;
  }
  __syncthreads();
  return red[32];
}

// Which packs of the group a thread visits: pixel p (its pack k) is base[p * row + k].
struct Walk {
  long long hw;
  std::size_t row;  // packs per pixel of the tensor (c / P)
  int q;            // packs per pixel of the group (cpg / P)
  int tq, tp;       // threads across a pixel's packs, pixels in flight
  int kq, kp;       // this thread's first pack and first pixel
};

// Calls f(pack, index, k) for every pack of the thread: pixels kp, kp + tp, ... of pack kq (then
// kq + tq, ... when q > blockDim), in that order. kUnroll packs are loaded before any is passed to
// f, so that many loads are in flight per thread even when f stores (x and y may alias, so the
// compiler could not hoist the loads over the stores by itself). The kernel takes kUnroll * P <=
// 16 elements: more spills at 64 registers a thread (the limit at 1024 threads a block).
template <int kUnroll, class V, class F>
__device__ __forceinline__ void for_each_pack(const V* xs, const Walk& w, F&& f) {
  if (w.kp >= w.tp) return;  // one of the (fewer than tq) threads past tq * tp
  for (int k = w.kq; k < w.q; k += w.tq)
    for (long long p = w.kp; p < w.hw; p += kUnroll * static_cast<long long>(w.tp)) {
      V v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const long long pu = p + u * static_cast<long long>(w.tp);
        if (pu < w.hw) v[u] = xs[std::size_t(pu) * w.row + std::size_t(k)];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const long long pu = p + u * static_cast<long long>(w.tp);
        if (pu < w.hw) f(v[u], std::size_t(pu) * w.row + std::size_t(k), k);
      }
    }
}

// grid: n * groups blocks (block i: sample i / groups, group i % groups); block: a multiple of 32
// threads, at most 1024. P: the pack width (cpg and c are multiples of P; x, y aligned to it).
// x and y may be the same buffer: a block writes only its own group, after its two statistics
// passes, and each element is read by the thread that writes it.
template <class T, int P>
__global__ void __launch_bounds__(kMaxThreads)
    group_norm_kernel(const T* x, T* y, int hw, int c, int groups, float eps, const float* __restrict__ gamma,
                      const float* __restrict__ beta, bool silu) {
  using V = Pack<T, P>;
  constexpr int U = P >= 8 ? 2 : 4;  // packs loaded at a time (for_each_pack)
  __shared__ float red[33];
  const int g = int(blockIdx.x % unsigned(groups));
  const std::size_t b = blockIdx.x / unsigned(groups);
  const int cpg = c / groups;
  Walk w;
  w.hw = hw;
  w.row = std::size_t(c) / P;
  w.q = cpg / P;
  w.tq = w.q < int(blockDim.x) ? w.q : int(blockDim.x);
  w.tp = int(blockDim.x) / w.tq;
  w.kq = int(threadIdx.x) % w.tq;
  w.kp = int(threadIdx.x) / w.tq;
  const std::size_t first = b * std::size_t(hw) * w.row + std::size_t(g) * std::size_t(w.q);
  const V* xs = reinterpret_cast<const V*>(x) + first;
  V* ys = reinterpret_cast<V*>(y) + first;
  const float count = float(std::size_t(hw) * std::size_t(cpg));

  // Pass 1: the mean.
  float sum = 0.0f;
  for_each_pack<U>(xs, w, [&](const V& v, std::size_t, int) {
#pragma unroll
    for (int e = 0; e < P; ++e) sum += to_f32(v.v[e]);
  });
  const float mean = block_sum(sum, red) / count;

  // Pass 2: the biased variance from the centred values.
  float sq = 0.0f;
  for_each_pack<U>(xs, w, [&](const V& v, std::size_t, int) {
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const float d = to_f32(v.v[e]) - mean;
      sq = fmaf(d, d, sq);
    }
  });
  const float var = block_sum(sq, red) / count;
  const float rstd = 1.0f / sqrtf(var + eps);

  // Pass 3: normalise, affine, SiLU, round once.
  for_each_pack<U>(xs, w, [&](const V& v, std::size_t i, int k) {
    const int ch0 = g * cpg + k * P;
    V out;
#pragma unroll
    for (int e = 0; e < P; ++e) {
      const float ga = gamma ? __ldg(gamma + ch0 + e) : 1.0f;
      const float be = beta ? __ldg(beta + ch0 + e) : 0.0f;
      float r = ((to_f32(v.v[e]) - mean) * rstd) * ga + be;
      if (silu) r = r / (1.0f + expf(-r));
      out.v[e] = from_f32<T>(r);
    }
    ys[i] = out;
  });
}

[[noreturn]] void invalid(const std::string& what) { throw Error(ErrorCode::InvalidArgument, "cuda group_norm: " + what); }

bool aligned(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

template <class T, int P>
void launch(const void* x, void* y, int n, int hw, int c, int groups, float eps, const float* gamma, const float* beta,
            bool silu, cudaStream_t stream) {
  const std::size_t group_len = std::size_t(hw) * std::size_t(c / groups);
  const unsigned threads = group_len >= (std::size_t(1) << 16) ? 1024u : group_len >= (std::size_t(1) << 13) ? 512u : 256u;
  const unsigned blocks = unsigned(std::size_t(n) * std::size_t(groups));
  DDIM_LAUNCH(blocks, threads, 0, stream, group_norm_kernel<T, P>)(static_cast<const T*>(x), static_cast<T*>(y), hw, c, groups,
                                                          eps, gamma, beta, silu);
}

}  // namespace

void group_norm(const void* x, void* y, DType t, int n, int hw, int c, int groups, float eps, const float* gamma,
                const float* beta, bool silu, cudaStream_t stream) {
  if (n < 0 || hw < 0) invalid("n and hw must be >= 0 (got n=" + std::to_string(n) + " hw=" + std::to_string(hw) + ")");
  if (c <= 0 || groups <= 0 || c % groups != 0)
    invalid("groups must divide c (got c=" + std::to_string(c) + " groups=" + std::to_string(groups) + ")");
  if (!(eps >= 0.0f)) invalid("eps must be >= 0");
  if (n == 0 || hw == 0) return;
  if (std::size_t(n) * std::size_t(groups) > 0x7fffffffu)
    invalid("n * groups must be < 2^31 (got n=" + std::to_string(n) + " groups=" + std::to_string(groups) + ")");
  if (!x || !y) invalid("x or y is null");
  const int cpg = c / groups;
  const std::size_t es = dtype_size(t);
  int p = int(16 / es);
  while (p > 1 && (cpg % p != 0 || !aligned(x, es * p) || !aligned(y, es * p))) p /= 2;
  dispatch_dtype(t, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (sizeof(T) <= 2) {
      if (p == 8) return launch<T, 8>(x, y, n, hw, c, groups, eps, gamma, beta, silu, stream);
    }
    if (p == 4) return launch<T, 4>(x, y, n, hw, c, groups, eps, gamma, beta, silu, stream);
    if (p == 2) return launch<T, 2>(x, y, n, hw, c, groups, eps, gamma, beta, silu, stream);
    launch<T, 1>(x, y, n, hw, c, groups, eps, gamma, beta, silu, stream);
  });
  check_launch("group_norm");
}

}  // namespace ddim::cuda
