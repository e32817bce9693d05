// Broken copies of the backend's kernels and their correct twins (mutants.hpp). Compiled like the
// kernels themselves (the emulator's prelude, instrumented), so the emulator sees exactly the
// kind of code it checks in kernels/.
#include "mutants.hpp"

#include "kernels/launch.cuh"

namespace ddim_emu::mutants {
namespace {

constexpr unsigned kFull = 0xffffffffu;

template <bool kDropBarrier>
__global__ void transpose_kernel(const float* __restrict__ x, float* __restrict__ y, int c, int hw) {
  __shared__ float tile[32][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
  for (int j = ty; j < 32; j += 8) {
    const int ch = c0 + j, p = p0 + tx;
    if (ch < c && p < hw) tile[j][tx] = x[ch * hw + p];
  }
  if (!kDropBarrier) __syncthreads();
  for (int j = ty; j < 32; j += 8) {
    const int p = p0 + j, ch = c0 + tx;
    if (ch < c && p < hw) y[p * c + ch] = tile[tx][j];
  }
}

__device__ float warp_sum(float v) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <bool kDropBarrier>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float red[33];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  float v = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? red[lane] : 0.f;
    s = warp_sum(s);
    if (lane == 0) red[32] = s;
  }
  if (!kDropBarrier) __syncthreads();
  if (threadIdx.x == blockDim.x - 1) out[blockIdx.x] = red[32];
}

template <bool kDropSyncwarp>
__global__ void warp_row_kernel(const float* __restrict__ p, float* __restrict__ out) {
  __shared__ float rows[4][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  rows[warp][lane] = p[blockIdx.x * blockDim.x + threadIdx.x];
  if (!kDropSyncwarp) __syncwarp();
  float s = 0.f;
  for (int j = 0; j < 32; ++j) s += rows[warp][(lane + j) % 32];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}

template <bool kOffByOne>
__global__ void add_bias_kernel(float* y, const float* __restrict__ bias, std::size_t total, int k) {
  const std::size_t end = kOffByOne ? total + 1 : total;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < end; i += std::size_t(gridDim.x) * blockDim.x)
    y[i] += bias[i % std::size_t(k)];
}

__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x == 0) return;
  out[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] += 1.f;
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < blockDim.x / 2) {
    out[threadIdx.x] = 1.f;
    __syncthreads();
  } else {
    out[threadIdx.x] = 2.f;
    __syncthreads();
  }
}

__global__ void shuffle_after_exit_kernel(float* out) {
  const int lane = threadIdx.x % 32;
  if (lane == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, float(lane), 1);
}

template <bool kAtomic>
__global__ void last_block_wins_kernel(unsigned* out) {
  if (threadIdx.x != 0) return;
  if (kAtomic) atomicMax(out, blockIdx.x);
  else out[0] = blockIdx.x;
}

__global__ void read_unwritten_shared_kernel(unsigned* out) {
  __shared__ unsigned never_written[64];
  out[threadIdx.x] = never_written[threadIdx.x];
}

__global__ void through_dynamic_shared_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  DDIM_DYNAMIC_SHARED(float, buffer);
  for (int i = threadIdx.x; i < n; i += blockDim.x) buffer[i] = x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buffer[n - 1 - i];
}

__global__ void copy_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}

__global__ void nothing_kernel() {}

__global__ void fresh_kernel(float* y) { y[threadIdx.x] = 1.f; }

}  // namespace

void transpose(const float* x, float* y, int c, int hw, bool drop_barrier, cudaStream_t stream) {
  const dim3 grid(unsigned((hw + 31) / 32), unsigned((c + 31) / 32)), block(32, 8);
  if (drop_barrier) DDIM_LAUNCH(grid, block, 0, stream, transpose_kernel<true>)(x, y, c, hw);
  else DDIM_LAUNCH(grid, block, 0, stream, transpose_kernel<false>)(x, y, c, hw);
}

void block_sum(const float* x, float* out, int blocks, int n, int threads, bool drop_barrier, cudaStream_t stream) {
  if (drop_barrier) DDIM_LAUNCH(unsigned(blocks), unsigned(threads), 0, stream, block_sum_kernel<true>)(x, out, n);
  else DDIM_LAUNCH(unsigned(blocks), unsigned(threads), 0, stream, block_sum_kernel<false>)(x, out, n);
}

void warp_row(const float* p, float* out, int warps, bool drop_syncwarp, cudaStream_t stream) {
  const unsigned threads = 128, blocks = unsigned(warps * 32) / threads;
  if (drop_syncwarp) DDIM_LAUNCH(blocks, threads, 0, stream, warp_row_kernel<true>)(p, out);
  else DDIM_LAUNCH(blocks, threads, 0, stream, warp_row_kernel<false>)(p, out);
}

void add_bias(float* y, const float* bias, std::size_t total, int k, bool off_by_one, cudaStream_t stream) {
  const unsigned blocks = unsigned((total + 255) / 256);
  if (off_by_one) DDIM_LAUNCH(blocks, 256, 0, stream, add_bias_kernel<true>)(y, bias, total, k);
  else DDIM_LAUNCH(blocks, 256, 0, stream, add_bias_kernel<false>)(y, bias, total, k);
}

void bad_barrier(float* out, bool early_exit, cudaStream_t stream) {
  if (early_exit) DDIM_LAUNCH(1, 64, 0, stream, early_exit_kernel)(out);
  else DDIM_LAUNCH(1, 64, 0, stream, divergent_barrier_kernel)(out);
}

void shuffle_after_exit(float* out, cudaStream_t stream) { DDIM_LAUNCH(1, 32, 0, stream, shuffle_after_exit_kernel)(out); }

void last_block_wins(unsigned* out, int blocks, bool atomic, cudaStream_t stream) {
  if (atomic) DDIM_LAUNCH(unsigned(blocks), 32, 0, stream, last_block_wins_kernel<true>)(out);
  else DDIM_LAUNCH(unsigned(blocks), 32, 0, stream, last_block_wins_kernel<false>)(out);
}

void read_unwritten_shared(unsigned* out, cudaStream_t stream) {
  DDIM_LAUNCH(1, 64, 0, stream, read_unwritten_shared_kernel)(out);
}

void through_dynamic_shared(const float* x, float* y, int n, std::size_t shared_bytes, cudaStream_t stream) {
  DDIM_LAUNCH(1, 64, shared_bytes, stream, through_dynamic_shared_kernel)(x, y, n);
}

void copy(const float* x, float* y, int n, cudaStream_t stream) {
  DDIM_LAUNCH(unsigned((n + 63) / 64), 64, 0, stream, copy_kernel)(x, y, n);
}

void launch_fresh_kernel(float* y, cudaStream_t stream) { DDIM_LAUNCH(1, 32, 0, stream, fresh_kernel)(y); }

cudaError_t launch_with_block(unsigned threads, std::size_t shared_bytes) {
  (void)cudaGetLastError();
  DDIM_LAUNCH(1, threads, shared_bytes, nullptr, nothing_kernel)();
  return cudaGetLastError();
}

}  // namespace ddim_emu::mutants
