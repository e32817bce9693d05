#pragma once
// Element-wise float math of the CPU backend, written once for a scalar and for a 16-lane GCC
// vector (f32x16, which the compiler lowers to whatever vector unit the build targets), so that
// every lane of every width gives the same bits as the scalar code: plain IEEE float operations in
// a fixed order, no FMA (the build has -ffp-contract=off), no library calls, selects instead of
// branches. map16 applies such a function to an array: 16 elements at a time, then the rest
// one by one, with identical results either way. with_isa runs a piece of such code compiled for
// the widest vector unit the session's instruction-set level allows (the same bits, faster).
//
// exp_f32: x clamped to [-87, 88]; n = round(x / ln 2) by the 1.5 * 2^23 trick; r = x - n ln 2 in
// two parts (Cody-Waite: ln 2 = 0.693359375 - 2.12194440e-4, the first exact in 10 bits);
// e^r by its degree-7 Taylor polynomial (|r| <= 0.35: truncation < 1e-8 relative); times 2^n built
// from the exponent bits. Within 2 ulp of e^x on [-87, 88]; NaN stays NaN; below -87 it returns
// e^-87 (1.6e-38) and above 88 e^88 (1.65e38), which SiLU and softmax never tell from 0 and inf.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "cpu/isa.hpp"

// The 16-lane vectors only pass between inline functions of one translation unit, so GCC's
// note that their by-value ABI differs with and without AVX-512 does not concern them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ddim::cpu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef std::int32_t i32x16 __attribute__((vector_size(64)));

template <class V>
struct IntOf;
template <>
struct IntOf<float> {
  using type = std::int32_t;
};
template <>
struct IntOf<f32x16> {
  using type = i32x16;
};

#define DDIM_ALWAYS_INLINE [[gnu::always_inline]] inline
#define DDIM_INLINE_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list

template <class V>
DDIM_ALWAYS_INLINE V splat(float c) {
  return V{} + c;  // 0 + c == c exactly
}

template <class V>
DDIM_ALWAYS_INLINE V exp_f32(V x) {
  using I = typename IntOf<V>::type;
  x = x < splat<V>(-87.0f) ? splat<V>(-87.0f) : x;
  x = x > splat<V>(88.0f) ? splat<V>(88.0f) : x;
  const V magic = splat<V>(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V t = x * splat<V>(1.44269504088896341f) + magic;
  const V n = t - magic;
  const I ni = std::bit_cast<I>(t) - std::bit_cast<I>(magic);
  const V r = (x - n * splat<V>(0.693359375f)) - n * splat<V>(-2.12194440e-4f);
  V p = splat<V>(1.0f / 5040.0f);
  p = p * r + splat<V>(1.0f / 720.0f);
  p = p * r + splat<V>(1.0f / 120.0f);
  p = p * r + splat<V>(1.0f / 24.0f);
  p = p * r + splat<V>(1.0f / 6.0f);
  p = p * r + splat<V>(0.5f);
  p = p * r + splat<V>(1.0f);
  p = p * r + splat<V>(1.0f);
  return p * std::bit_cast<V>((ni + 127) << 23);
}

// SiLU: v * sigmoid(v) as v / (1 + e^-v).
template <class V>
DDIM_ALWAYS_INLINE V silu_f32(V v) {
  return v / (splat<V>(1.0f) + exp_f32(-v));
}

// y[i] = f(x[i]) for i < count, f a generic callable of float and f32x16 (x and y may be equal).
template <class F>
DDIM_ALWAYS_INLINE void map16(const float* x, float* y, std::size_t count, F&& f) {
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    f32x16 v;
    std::memcpy(&v, x + i, sizeof v);
    v = f(v);
    std::memcpy(y + i, &v, sizeof v);
  }
  for (; i < count; ++i) y[i] = f(x[i]);
}

// f() (a lambda declared DDIM_INLINE_LAMBDA, calling only always-inline helpers) compiled for
// AVX-512 or AVX2 when `isa` allows, else for the build's baseline.
#if defined(__x86_64__)
template <class F>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void run_avx512(const F& f) {
  f();
}
template <class F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
#endif
template <class F>
inline void with_isa(Isa isa, const F& f) {
#if defined(__x86_64__)
  if (isa >= Isa::Avx512) return run_avx512(f);
  if (isa == Isa::Avx2) return run_avx2(f);
#endif
  (void)isa;
  f();
}

}  // namespace ddim::cpu
