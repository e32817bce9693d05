#pragma once
// Deliberately broken copies of the backend's kernels (tests/emu/mutants.cu), each next to its
// correct twin, for the emulator's mutation tests (test_emu.cpp): the broken one must be reported
// by the check named, the correct one must not be. Launchers enqueue on `stream`; pointers are
// device pointers.
#include <cuda_runtime_api.h>

#include <cstddef>

namespace ddim_emu::mutants {

// kernels/elementwise.cu's NCHW fp32 -> NHWC transpose through a 32 x 33 shared tile, for n = 1:
// x (c, hw) -> y (hw, c). `drop_barrier`: without the __syncthreads between filling the tile and
// reading it back (racecheck).
void transpose(const float* x, float* y, int c, int hw, bool drop_barrier, cudaStream_t stream);

// kernels/group_norm.cu's block_sum: out[b] = sum of x[b * n .. (b + 1) * n), one block of
// `threads` (a multiple of 32) per b. `drop_barrier`: without its second __syncthreads, so the
// other warps read the total before warp 0 wrote it (racecheck).
void block_sum(const float* x, float* out, int blocks, int n, int threads, bool drop_barrier, cudaStream_t stream);

// kernels/attention.cu's per-warp probability row: each lane writes its p to shared memory, then
// every lane reads the whole row. `drop_syncwarp`: without the __syncwarp between (racecheck).
void warp_row(const float* p, float* out, int warps, bool drop_syncwarp, cudaStream_t stream);

// kernels/conv_epilogue.cu's grid-stride loop: y[i] += bias[i % k] for i < total.
// `off_by_one`: loops to i <= total (memcheck: one element past the end of y).
void add_bias(float* y, const float* bias, std::size_t total, int k, bool off_by_one, cudaStream_t stream);

// Barrier misuse (synccheck): `early_exit`: thread 0 returns before a __syncthreads the others
// reach; otherwise the lower half of the block waits at a different __syncthreads than the
// upper half.
void bad_barrier(float* out, bool early_exit, cudaStream_t stream);

// A full-mask shuffle after lane 31 exited (synccheck).
void shuffle_after_exit(float* out, cudaStream_t stream);

// Every block writes its index to out[0] (a global write-write race: the result depends on the
// block order, which the schedule comparison reports). `atomic`: atomicMax instead (fine).
void last_block_wins(unsigned* out, int blocks, bool atomic, cudaStream_t stream);

// Reads `words` uint32 of shared memory that no thread wrote (initcheck).
void read_unwritten_shared(unsigned* out, cudaStream_t stream);

// Copies n floats through a dynamic shared buffer of `shared_bytes` (memcheck when n * 4 is more).
void through_dynamic_shared(const float* x, float* y, int n, std::size_t shared_bytes, cudaStream_t stream);

// y[i] = x[i] for i < n (a plain copy kernel, for the memory checks).
void copy(const float* x, float* y, int n, cudaStream_t stream);

// y[i] = 1 for i < 32, by a kernel nothing else launches (for the lazy-loading check: its first
// launch happens where the test puts it).
void launch_fresh_kernel(float* y, cudaStream_t stream);

// Launches with a bad configuration (the launch's own error, via cudaGetLastError).
cudaError_t launch_with_block(unsigned threads, std::size_t shared_bytes);

}  // namespace ddim_emu::mutants
