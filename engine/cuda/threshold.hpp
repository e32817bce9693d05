#pragma once
// Dynamic thresholding on the device (Imagen; diffusers' DDIMScheduler._threshold_sample): the
// per-sample bound s = clamp(quantile(|x0|, ratio), 1, max_value) of ddim::dynamic_threshold
// (engine/schedule/ddim_params.hpp), bit for bit, for a batch of samples. kernels/threshold.cu.
//
// Exact and deterministic: the two order statistics the quantile interpolates are found by radix
// select over the bit patterns of |x0| (integer histograms, so the launch shape and the order of
// the atomics never matter), and the interpolation and the clamp are the host's double
// expressions with explicitly rounded operations (no FMA contraction).
//
// NaN: a sample holding a NaN gets the quiet NaN 0x7fc00000, as the host function returns
// std::numeric_limits<float>::quiet_NaN() (torch.quantile propagates NaN). A NaN that the
// arithmetic itself produces (an infinite |x0| among the two order statistics: inf - inf, 0 * inf,
// as on the host) is also returned as 0x7fc00000; the host's NaN there has the sign bit of the
// CPU's default NaN (set on x86), so such results agree as NaN, not bitwise.
#include <cuda_runtime_api.h>

#include <cstddef>

namespace ddim::cuda {

// Scratch bytes dynamic_thresholds needs for n samples of E values (0 when n <= 0): 2080 bytes per
// sample (two 256-bin histograms and 8 words of state); independent of E.
std::size_t dynamic_threshold_scratch_bytes(int n, std::size_t E);

// thresholds[b] = ddim::dynamic_threshold(x0[b*E .. (b+1)*E), ratio, max_value) for b < n, bitwise
// (NaN results as described above).
// x0: device fp32 (n, E), any element order within a sample (the quantile does not depend on it);
// thresholds: device fp32 (n); scratch: device memory of at least dynamic_threshold_scratch_bytes
// (n, E) bytes, 4-byte aligned, not shared with a concurrent call (it is re-initialised on the
// stream by every call). Enqueues 9 operations on `stream` (a memset and 8 kernels); no allocation,
// no synchronisation, so it can be captured in a CUDA graph.
// Throws ddim::Error(InvalidArgument) before enqueueing anything when E == 0, ratio is not in
// (0, 1], n < 0, n > 65535, E > 2^32 - 1, a pointer is null (n > 0) or the scratch is too small or
// misaligned. n == 0 enqueues nothing.
void dynamic_thresholds(const float* x0, int n, std::size_t E, double ratio, double max_value, float* thresholds,
                        void* scratch, std::size_t scratch_bytes, cudaStream_t stream);

// Loads the two kernels dynamic_thresholds launches (cudaFuncGetAttributes): see
// load_sampling_kernels (cuda/kernels.hpp).
void load_threshold_kernels();

}  // namespace ddim::cuda
