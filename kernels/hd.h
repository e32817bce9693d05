#pragma once
// Shared host/device helpers. Per-element math that both backends run lives in headers that
// include this one, so the CPU tests check the very arithmetic the GPU runs.
//
// Rounding: host code is built with -ffp-contract=off, and on the device the rn_* helpers below
// are the explicitly rounded CUDA intrinsics (__fadd_rn, __fmul_rn, ...), which nvcc never fuses
// into FMAs even with --fmad=true: every operation rounds once, identically, on both sides. Shared
// math must therefore use rn_* for every float operation, never plain + - * /.
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DDIM_HD __host__ __device__ __forceinline__
#else
#define DDIM_HD inline
#endif

namespace ddim::hd {

#if defined(__CUDA_ARCH__)
DDIM_HD float rn_add(float a, float b) { return __fadd_rn(a, b); }
DDIM_HD float rn_sub(float a, float b) { return __fsub_rn(a, b); }
DDIM_HD float rn_mul(float a, float b) { return __fmul_rn(a, b); }
DDIM_HD float rn_div(float a, float b) { return __fdiv_rn(a, b); }
DDIM_HD float rn_sqrt(float a) { return __fsqrt_rn(a); }
DDIM_HD std::uint32_t mulhi(std::uint32_t a, std::uint32_t b) { return __umulhi(a, b); }
#else
DDIM_HD float rn_add(float a, float b) { return a + b; }
DDIM_HD float rn_sub(float a, float b) { return a - b; }
DDIM_HD float rn_mul(float a, float b) { return a * b; }
DDIM_HD float rn_div(float a, float b) { return a / b; }
DDIM_HD float rn_sqrt(float a) { return std::sqrt(a); }  // IEEE sqrt: correctly rounded
DDIM_HD std::uint32_t mulhi(std::uint32_t a, std::uint32_t b) {
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
}
#endif

DDIM_HD float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

}  // namespace ddim::hd
