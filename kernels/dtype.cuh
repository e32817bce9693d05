#pragma once
// Element types of the CUDA kernels: load as float, store rounded to nearest even, and the
// dispatch from the runtime DType to a template instantiation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/kernels.hpp"
#include "ddim/error.hpp"

namespace ddim::cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Calls f(T{}) with T the C++ type of `t`.
template <class F> void dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F32: f(float{}); return;
    case DType::F16: f(__half{}); return;
    case DType::BF16: f(__nv_bfloat16{}); return;
  }
  throw Error(ErrorCode::Internal, "cuda: unknown element type");
}

// Blocks for a grid-stride loop over `count` items with `threads` per block (count > 0).
inline unsigned grid_for(std::size_t count, unsigned threads, unsigned max_blocks = 65535u * 8u) {
  const std::size_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < max_blocks ? blocks : max_blocks);
}

}  // namespace ddim::cuda
