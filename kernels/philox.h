#pragma once
// Counter-based normal noise, bitwise identical on the host and the device.
//
// Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011): multipliers 0xD2511F53 / 0xCD9E8D57, Weyl key increments 0x9E3779B9 /
// 0xBB67AE85, 10 rounds. Checked against the Random123 known-answer vectors.
//
// Layout of one draw:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block & 0xffffffff, block >> 32, step, stream),  block = element / 4
//   stream  = kNoiseStreamInitial (0): the initial x_T (step = 0)
//             kNoiseStreamStep    (1): the per-step noise of the step with index `step` in
//                                      sampling order (0 = the first, most noisy step)
// One Philox block (4 x uint32) gives 4 consecutive elements, so an element's value depends only
// on (seed, stream, step, element): never on the batch composition or the launch shape.
//
// uint32 -> float: u = ((x >> 9) + 0.5) * 2^-23 = (2k + 1) * 2^-24, k = x >> 9 in [0, 2^23).
//   Every u is an odd multiple of 2^-24 below 1, hence exactly representable and never 0 or 1:
//   min 2^-24, max 1 - 2^-24. (24 bits, ((x >> 8) + 0.5) * 2^-24, would need 25 significant bits
//   and round to 1.0 at the top.)
// Box-Muller: lanes (x0, x1) -> elements 4b, 4b+1 as r cos(theta), r sin(theta) with
//   r = sqrt(-2 ln u(x0)), theta = 2 pi u(x1); lanes (x2, x3) -> elements 4b+2, 4b+3 alike.
//
// No library log/sin/cos (their last bits differ between glibc and CUDA's libdevice): ln and
// sincos below are built from correctly rounded +, -, *, /, sqrt only (hd::rn_*, no contraction),
// so every step rounds identically on both sides. Constants are hex literals: exact floats.
//   ln(u):  u = 2^e m with m in [sqrt(1/2), sqrt(2)) by exact bit manipulation;
//           ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^11/11), s = (m - 1)/(m + 1), |s| < 0.172;
//           ln u = e ln2_hi + (e ln2_lo + ln m)  (ln2_hi has 17 bits, so e ln2_hi is exact).
//   sincos(2 pi u): u = q/4 + r with q = round(4u) (exact), theta = 2 pi r in [-pi/4, pi/4];
//           Taylor polynomials to theta^11 (sin) and theta^10 (cos), then the quadrant swap by q.
// Accuracy (tests/cpp/test_philox.cpp, exhaustive over every u this generator produces):
//   sin/cos absolute error < 2e-7; ln absolute error < 2e-7 + 2^-23 |ln u| (within about one
//   float ulp of the result; |ln u| reaches 16.6, where a float ulp is 1.9e-6).
#include <cstdint>
#include <cstring>

#include "kernels/hd.h"

namespace ddim {

enum : std::uint32_t { kNoiseStreamInitial = 0, kNoiseStreamStep = 1 };

struct PhiloxBlock {
  std::uint32_t v[4];
};
struct Normal4 {
  float v[4];
};

namespace philox_detail {
constexpr std::uint32_t kM0 = 0xD2511F53u;
constexpr std::uint32_t kM1 = 0xCD9E8D57u;
constexpr std::uint32_t kW0 = 0x9E3779B9u;
constexpr std::uint32_t kW1 = 0xBB67AE85u;

DDIM_HD std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
DDIM_HD float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
}  // namespace philox_detail

// Philox4x32-10 of one counter under one key.
DDIM_HD PhiloxBlock philox4x32_10(PhiloxBlock ctr, std::uint32_t k0, std::uint32_t k1) {
  using namespace philox_detail;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    const std::uint32_t hi0 = hd::mulhi(kM0, ctr.v[0]);
    const std::uint32_t lo0 = kM0 * ctr.v[0];
    const std::uint32_t hi1 = hd::mulhi(kM1, ctr.v[2]);
    const std::uint32_t lo1 = kM1 * ctr.v[2];
    ctr = PhiloxBlock{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// uint32 -> uniform in (0, 1): (2 (x >> 9) + 1) * 2^-24, exact.
DDIM_HD float philox_uniform(std::uint32_t x) {
  return static_cast<float>((x >> 9) * 2u + 1u) * 0x1p-24f;
}

// Natural logarithm of a positive normal float (the generator only asks for u in (0, 1)).
DDIM_HD float philox_log(float u) {
  using namespace hd;
  using namespace philox_detail;
  const std::uint32_t bits = float_bits(u);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 127;
  std::uint32_t mbits = (bits & 0x007fffffu) | 0x3f800000u;  // m in [1, 2)
  if (mbits >= 0x3fb504f4u) {                                // m >= sqrt(2): use m/2, e+1
    mbits -= 0x00800000u;
    e += 1;
  }
  const float m = bits_float(mbits);
  const float s = rn_div(rn_sub(m, 1.f), rn_add(m, 1.f));
  const float s2 = rn_mul(s, s);
  float p = 0x1.745d18p-3f;                   // 2/11
  p = rn_add(0x1.c71c72p-3f, rn_mul(s2, p));  // 2/9
  p = rn_add(0x1.24924ap-2f, rn_mul(s2, p));  // 2/7
  p = rn_add(0x1.99999ap-2f, rn_mul(s2, p));  // 2/5
  p = rn_add(0x1.555556p-1f, rn_mul(s2, p));  // 2/3
  const float ln_m = rn_add(rn_add(s, s), rn_mul(rn_mul(s, s2), p));
  const float fe = static_cast<float>(e);
  constexpr float kLn2Hi = 0x1.62e3p-1f;       // 0.693138122558594
  constexpr float kLn2Lo = 0x1.2fefa2p-17f;    // 9.05800061e-6: ln 2 - kLn2Hi
  return rn_add(rn_mul(fe, kLn2Hi), rn_add(rn_mul(fe, kLn2Lo), ln_m));
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1] a multiple of 2^-24 (the generator's uniforms).
DDIM_HD void philox_sincos_2pi(float u, float* sin_out, float* cos_out) {
  using namespace hd;
  const int q = static_cast<int>(rn_add(rn_mul(4.f, u), 0.5f));  // nearest quarter; no ties occur
  const float r = rn_sub(u, rn_mul(static_cast<float>(q), 0.25f));  // exact, |r| <= 1/8
  const float th = rn_mul(0x1.921fb6p+2f, r);  // 2 pi; |theta| <= pi/4
  const float t2 = rn_mul(th, th);
  // sin: th - th^3/3! + ... - th^11/11!
  float ps = -0x1.ae6456p-26f;                 // -1/11!
  ps = rn_add(0x1.71de3ap-19f, rn_mul(t2, ps));   // 1/9!
  ps = rn_add(-0x1.a01a02p-13f, rn_mul(t2, ps));  // -1/7!
  ps = rn_add(0x1.111112p-7f, rn_mul(t2, ps));    // 1/5!
  ps = rn_add(-0x1.555556p-3f, rn_mul(t2, ps));   // -1/3!
  const float sn = rn_add(th, rn_mul(rn_mul(th, t2), ps));
  // cos: 1 - th^2/2! + ... - th^10/10!
  float pc = -0x1.27e4fcp-22f;                 // -1/10!
  pc = rn_add(0x1.a01a02p-16f, rn_mul(t2, pc));   // 1/8!
  pc = rn_add(-0x1.6c16c2p-10f, rn_mul(t2, pc));  // -1/6!
  pc = rn_add(0x1.555556p-5f, rn_mul(t2, pc));    // 1/4!
  pc = rn_add(-0.5f, rn_mul(t2, pc));             // -1/2!
  const float cs = rn_add(1.f, rn_mul(t2, pc));
  switch (q & 3) {
    case 0: *sin_out = sn; *cos_out = cs; break;
    case 1: *sin_out = cs; *cos_out = -sn; break;
    case 2: *sin_out = -sn; *cos_out = -cs; break;
    default: *sin_out = -cs; *cos_out = sn; break;
  }
}

// The raw Philox block of (seed, stream, step, block).
DDIM_HD PhiloxBlock philox_noise_block(std::uint64_t seed, std::uint32_t stream, std::uint32_t step,
                                       std::uint64_t block) {
  const PhiloxBlock ctr{{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), step, stream}};
  return philox4x32_10(ctr, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
}

// Two unit normals from two uint32 lanes (Box-Muller).
DDIM_HD void philox_box_muller(std::uint32_t a, std::uint32_t b, float* z0, float* z1) {
  using namespace hd;
  const float r = rn_sqrt(rn_mul(-2.f, philox_log(philox_uniform(a))));
  float s, c;
  philox_sincos_2pi(philox_uniform(b), &s, &c);
  *z0 = rn_mul(r, c);
  *z1 = rn_mul(r, s);
}

// Elements 4 block .. 4 block + 3 of the noise of (seed, stream, step).
DDIM_HD Normal4 philox_normal4(std::uint64_t seed, std::uint32_t stream, std::uint32_t step, std::uint64_t block) {
  const PhiloxBlock x = philox_noise_block(seed, stream, step, block);
  Normal4 n;
  philox_box_muller(x.v[0], x.v[1], &n.v[0], &n.v[1]);
  philox_box_muller(x.v[2], x.v[3], &n.v[2], &n.v[3]);
  return n;
}

// Element `element` of the noise of (seed, stream, step).
DDIM_HD float philox_normal(std::uint64_t seed, std::uint32_t stream, std::uint32_t step, std::uint64_t element) {
  const PhiloxBlock x = philox_noise_block(seed, stream, step, element >> 2);
  const unsigned lane = static_cast<unsigned>(element & 3u);
  float z0, z1;
  if (lane < 2)
    philox_box_muller(x.v[0], x.v[1], &z0, &z1);
  else
    philox_box_muller(x.v[2], x.v[3], &z0, &z1);
  return (lane & 1u) ? z1 : z0;
}

}  // namespace ddim
