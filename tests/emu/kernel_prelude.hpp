#pragma once
// Force-included (g++ -include) into every kernel translation unit (kernels/*.cu, compiled as
// C++) of the emulated build: it maps the CUDA C++ dialect the kernels use onto the emulator
// (tests/emu/runtime.hpp). A test tool, not part of the product.
//
// What it does:
//   * `__global__`, `__device__`, `__host__`, `__forceinline__`, `__launch_bounds__` become plain
//     C++; a kernel is an ordinary function that the emulator runs once per CUDA thread, each
//     CUDA thread a fiber with its own stack (so locals are per thread, as registers are).
//   * `__shared__` variables become statics in the ELF section `ddim_emu_shared`: one instance,
//     used by one block at a time (blocks run one after another), and the whole section is the
//     address window the shared-memory checks watch. Dynamic shared memory is DDIM_DYNAMIC_SHARED
//     (kernels/launch.cuh), a buffer in the same section.
//   * threadIdx / blockIdx / blockDim / gridDim read the running fiber's coordinates.
//   * __syncthreads, __syncwarp, the shuffles, the votes and the atomics call the emulator, which
//     checks them (barrier divergence, masks naming absent lanes, races on shared memory).
//   * fp16 / bf16 come from the CUDA headers' host code; the rounding intrinsics are the host's
//     correctly rounded IEEE operations (the file is compiled with -ffp-contract=off).
// Every memory access of a kernel translation unit is instrumented by the compiler
// (-fsanitize=thread, whose hooks tests/emu/hooks.cpp implements: no sanitizer runtime is
// linked), which is how the emulator sees the addresses a kernel reads and writes.
//
// Anything not mapped here is either a compile error (device-only intrinsics that the CUDA
// headers declare for nvcc only: not declared) or made one below (__constant__, __managed__, ...):
// never a silent difference.
#if defined(__CUDACC__)
#error "tests/emu/kernel_prelude.hpp is for the emulated build (g++), not for nvcc"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime.hpp"

#define DDIM_CUDA_EMU_KERNEL 1

// ---------------------------------------------------------------- keywords
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __shared__
#undef __launch_bounds__
#undef __constant__
#undef __managed__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("ddim_emu_shared"), aligned(16)))
#define __constant__ _Pragma("GCC error \"__constant__ memory is not emulated (tests/emu)\"")
#define __managed__ _Pragma("GCC error \"__managed__ memory is not emulated (tests/emu)\"")
#define __grid_constant__ _Pragma("GCC error \"__grid_constant__ is not emulated (tests/emu)\"")

// ---------------------------------------------------------------- built-in variables
#undef threadIdx
#undef blockIdx
#undef blockDim
#undef gridDim
#undef warpSize
#define threadIdx (::ddim_emu::current_thread()->thread_idx)
#define blockIdx (::ddim_emu::current_block()->block_idx)
#define blockDim (::ddim_emu::current_block()->block_dim)
#define gridDim (::ddim_emu::current_block()->grid_dim)
#define warpSize 32

// ---------------------------------------------------------------- barriers, warp intrinsics
inline void __syncthreads(std::source_location at = std::source_location::current()) { ::ddim_emu::syncthreads(at); }
inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location at = std::source_location::current()) {
  (void)::ddim_emu::warp_collective(::ddim_emu::WarpOp::Sync, mask, 0, 0, 32, at);
}

namespace ddim_emu::detail {
template <class T>
inline constexpr bool kShuffleable = std::is_trivially_copyable_v<T> && sizeof(T) <= 8;
template <class T>
std::uint64_t to_bits(T v) {
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}
template <class T>
T from_bits(std::uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
template <class T>
T shuffle(WarpOp op, unsigned mask, T v, int arg, int width, std::source_location at) {
  static_assert(kShuffleable<T>, "shuffles move values of at most 8 bytes");
  return from_bits<T>(warp_collective(op, mask, to_bits(v), arg, width, at));
}
}  // namespace ddim_emu::detail

template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, std::source_location at = std::source_location::current()) {
  return ::ddim_emu::detail::shuffle(::ddim_emu::WarpOp::ShflIdx, mask, v, src_lane, width, at);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, std::source_location at = std::source_location::current()) {
  return ::ddim_emu::detail::shuffle(::ddim_emu::WarpOp::ShflXor, mask, v, lane_mask, width, at);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, std::source_location at = std::source_location::current()) {
  return ::ddim_emu::detail::shuffle(::ddim_emu::WarpOp::ShflUp, mask, v, int(delta), width, at);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, std::source_location at = std::source_location::current()) {
  return ::ddim_emu::detail::shuffle(::ddim_emu::WarpOp::ShflDown, mask, v, int(delta), width, at);
}
inline unsigned __ballot_sync(unsigned mask, int pred, std::source_location at = std::source_location::current()) {
  return unsigned(::ddim_emu::warp_collective(::ddim_emu::WarpOp::Ballot, mask, pred != 0, 0, 32, at));
}
inline int __all_sync(unsigned mask, int pred, std::source_location at = std::source_location::current()) {
  return int(::ddim_emu::warp_collective(::ddim_emu::WarpOp::All, mask, pred != 0, 0, 32, at));
}
inline int __any_sync(unsigned mask, int pred, std::source_location at = std::source_location::current()) {
  return int(::ddim_emu::warp_collective(::ddim_emu::WarpOp::Any, mask, pred != 0, 0, 32, at));
}

// ---------------------------------------------------------------- runtime API overloads nvcc provides
// (cuda_runtime.h declares these templates for nvcc only): kernel functions as `const void*`.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// ---------------------------------------------------------------- memory
template <class T>
T __ldg(const T* p) {
  return *p;  // an ordinary (instrumented, checked) read
}

// Atomics: checked as atomic accesses (they never race with each other), done by the runtime.
inline unsigned atomicAdd(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::Add, v); }
inline int atomicAdd(int* p, int v) {
  return int(::ddim_emu::atomic_u32(reinterpret_cast<unsigned*>(p), ::ddim_emu::AtomicOp::Add, unsigned(v)));
}
inline unsigned atomicOr(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::Or, v); }
inline unsigned atomicAnd(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::And, v); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::Max, v); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::Min, v); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return ::ddim_emu::atomic_u32(p, ::ddim_emu::AtomicOp::Exch, v); }
inline float atomicAdd(float* p, float v) { return ::ddim_emu::atomic_add_f32(p, v); }

// ---------------------------------------------------------------- arithmetic intrinsics
// Correctly rounded host operations (this translation unit has no FMA contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double a) { return static_cast<float>(a); }
inline double __uint2double_rn(unsigned a) { return static_cast<double>(a); }
inline double __int2double_rn(int a) { return static_cast<double>(a); }
inline float __uint2float_rn(unsigned a) { return static_cast<float>(a); }  // host default rounding: nearest even
inline float __int2float_rn(int a) { return static_cast<float>(a); }
inline unsigned __float_as_uint(float f) { return ::ddim_emu::detail::from_bits<unsigned>(::ddim_emu::detail::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::ddim_emu::detail::from_bits<float>(::ddim_emu::detail::to_bits(u)); }
inline int __float_as_int(float f) { return ::ddim_emu::detail::from_bits<int>(::ddim_emu::detail::to_bits(f)); }
inline float __int_as_float(int u) { return ::ddim_emu::detail::from_bits<float>(::ddim_emu::detail::to_bits(u)); }
inline double __longlong_as_double(long long v) { return ::ddim_emu::detail::from_bits<double>(::ddim_emu::detail::to_bits(v)); }
inline long long __double_as_longlong(double v) { return ::ddim_emu::detail::from_bits<long long>(::ddim_emu::detail::to_bits(v)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((std::uint64_t(a) * b) >> 32); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(unsigned v) { return v == 0 ? 32 : __builtin_clz(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(int(v)); }
