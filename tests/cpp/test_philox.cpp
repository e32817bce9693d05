// Philox4x32-10 and the normal noise built on it (kernels/philox.h, engine/sampler/noise.cpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/philox.h"
#include "sampler/noise.hpp"

#ifndef DDIM_TEST_DATA_DIR
#error "the test build defines DDIM_TEST_DATA_DIR (tests/data: philox4x32_10_kat.txt)"
#endif

namespace {

// Every value philox_uniform can return: (2k + 1) 2^-24, k in [0, 2^23).
float uniform_of_k(std::uint32_t k) { return ddim::philox_uniform(k << 9); }

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

}  // namespace

TEST_CASE("philox: Random123 known-answer vectors") {
  const std::string path = DDIM_TEST_DATA_DIR "/philox4x32_10_kat.txt";
  std::ifstream in(path);
  if (!in) FAIL("cannot open the Philox known-answer vectors at " << path);
  int checked = 0;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream ls(line);
    std::string name;
    int rounds = 0;
    ls >> name >> std::dec >> rounds;
    std::uint32_t v[10];
    for (std::uint32_t& x : v) ls >> std::hex >> x;
    REQUIRE_MESSAGE(!ls.fail(), "malformed line: " << line);
    REQUIRE(name == "philox4x32");
    REQUIRE(rounds == 10);
    const ddim::PhiloxBlock out = ddim::philox4x32_10(ddim::PhiloxBlock{{v[0], v[1], v[2], v[3]}}, v[4], v[5]);
    CAPTURE(line);
    for (int i = 0; i < 4; ++i) CHECK(out.v[i] == v[6 + i]);
    ++checked;
  }
  CHECK(checked == 3);
}

TEST_CASE("philox: uniforms are exact odd multiples of 2^-24 strictly inside 0..1") {
  CHECK(ddim::philox_uniform(0u) == std::ldexp(1.0f, -24));
  CHECK(ddim::philox_uniform(0xffffffffu) == 1.0f - std::ldexp(1.0f, -24));
  CHECK(ddim::philox_uniform(0x80000000u) == 0.5f + std::ldexp(1.0f, -24));
  // The 9 low bits are dropped; the value is (2 (x >> 9) + 1) 2^-24 exactly.
  std::mt19937 rng(5);
  int wrong = 0;
  for (int i = 0; i < 100000; ++i) {
    const std::uint32_t x = static_cast<std::uint32_t>(rng());
    const float u = ddim::philox_uniform(x);
    if (static_cast<double>(u) != (2.0 * (x >> 9) + 1.0) * std::ldexp(1.0, -24) || !(u > 0.0f && u < 1.0f)) ++wrong;
  }
  CHECK(wrong == 0);
}

TEST_CASE("philox: ln and sincos of 2 pi u over every uniform the generator produces") {
  double max_ln_excess = -1, max_ln_err = 0, max_sin_err = 0, max_cos_err = 0;
  const double two_pi = 6.283185307179586476925;
  for (std::uint32_t k = 0; k < (1u << 23); ++k) {
    const float u = uniform_of_k(k);
    const double ud = u;
    const double ln_ref = std::log(ud);
    const double ln_err = std::abs(static_cast<double>(ddim::philox_log(u)) - ln_ref);
    max_ln_err = std::max(max_ln_err, ln_err);
    // Absolute 2e-7, or about one float ulp of the result where |ln u| is large.
    max_ln_excess = std::max(max_ln_excess, ln_err - (2e-7 + std::ldexp(1.0, -23) * std::abs(ln_ref)));
    float s, c;
    ddim::philox_sincos_2pi(u, &s, &c);
    max_sin_err = std::max(max_sin_err, std::abs(s - std::sin(two_pi * ud)));
    max_cos_err = std::max(max_cos_err, std::abs(c - std::cos(two_pi * ud)));
  }
  MESSAGE("max |ln err| " << max_ln_err << ", |sin err| " << max_sin_err << ", |cos err| " << max_cos_err);
  CHECK(max_ln_excess <= 0.0);
  CHECK(max_sin_err < 2e-7);
  CHECK(max_cos_err < 2e-7);
  // Where |ln u| < 1 the bound is absolute.
  double small_err = 0;
  for (std::uint32_t k = (1u << 23) / 3; k < (1u << 23); k += 3) {
    const float u = uniform_of_k(k);
    small_err = std::max(small_err, std::abs(static_cast<double>(ddim::philox_log(u)) - std::log(static_cast<double>(u))));
  }
  CHECK(small_err < 2e-7);
  // Exact points.
  float s, c;
  ddim::philox_sincos_2pi(0.25f, &s, &c);
  CHECK(s == 1.0f);
  CHECK(c == 0.0f);
  ddim::philox_sincos_2pi(0.5f, &s, &c);
  CHECK(c == -1.0f);
  CHECK(ddim::philox_log(1.0f) == 0.0f);
  CHECK(ddim::philox_log(0.5f) == doctest::Approx(-0.69314718).epsilon(1e-7));
}

TEST_CASE("philox: normal samples have mean 0 and variance 1 and no NaN or Inf") {
  const std::size_t n = 1000000;
  std::vector<float> z(n);
  ddim::fill_normal(42, ddim::kNoiseStreamInitial, 0, z);
  double sum = 0, sum2 = 0, sum4 = 0;
  std::size_t beyond3 = 0, bad = 0;
  for (float v : z) {
    if (!std::isfinite(v)) ++bad;
    sum += v;
    sum2 += static_cast<double>(v) * v;
    sum4 += static_cast<double>(v) * v * v * v;
    if (std::abs(v) > 3) ++beyond3;
  }
  const double mean = sum / n, var = sum2 / n - mean * mean;
  MESSAGE("mean " << mean << ", var " << var << ", kurtosis " << sum4 / n);
  CHECK(bad == 0);
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::abs(var - 1) < 0.01);
  CHECK(std::abs(sum4 / n - 3) < 0.05);
  CHECK(static_cast<double>(beyond3) / n == doctest::Approx(0.0027).epsilon(0.15));  // P(|z| > 3)
  // The largest |z| is sqrt(-2 ln 2^-24) ~ 5.77.
  float largest = 0;
  for (float v : z) largest = std::max(largest, std::abs(v));
  CHECK(largest <= 5.8f);
}

TEST_CASE("philox: an element value depends only on seed and stream and step and element") {
  const std::uint64_t seed = 0x0123456789abcdefull;
  std::vector<float> all(4099);
  ddim::fill_normal(seed, ddim::kNoiseStreamStep, 17, all);
  std::mt19937_64 rng(9);
  int differ = 0;
  for (int i = 0; i < 2000; ++i) {
    const std::size_t e = static_cast<std::size_t>(rng() % all.size());
    if (bits(ddim::philox_normal(seed, ddim::kNoiseStreamStep, 17, e)) != bits(all[e])) ++differ;
  }
  CHECK(differ == 0);
  // A shorter buffer (partial last block) is a prefix of the longer one.
  std::vector<float> part(7);
  ddim::fill_normal(seed, ddim::kNoiseStreamStep, 17, part);
  for (std::size_t i = 0; i < part.size(); ++i) CHECK(bits(part[i]) == bits(all[i]));
  // Blocks: philox_normal4 gives elements 4b .. 4b+3.
  const ddim::Normal4 b = ddim::philox_normal4(seed, ddim::kNoiseStreamStep, 17, 100);
  for (int j = 0; j < 4; ++j) CHECK(bits(b.v[j]) == bits(all[400 + static_cast<std::size_t>(j)]));
  // Elements far beyond 2^32 (block high word) work and differ from the low ones.
  CHECK(ddim::philox_normal(seed, 1, 17, (1ull << 34) + 5) != ddim::philox_normal(seed, 1, 17, 5));
  // Every coordinate of the key and counter matters.
  const float base = ddim::philox_normal(seed, 1, 17, 5);
  CHECK(ddim::philox_normal(seed + 1, 1, 17, 5) != base);
  CHECK(ddim::philox_normal(seed ^ (1ull << 40), 1, 17, 5) != base);
  CHECK(ddim::philox_normal(seed, 0, 17, 5) != base);
  CHECK(ddim::philox_normal(seed, 1, 18, 5) != base);
  CHECK(ddim::philox_normal(seed, 1, 17, 6) != base);
  std::vector<float> empty;
  CHECK_NOTHROW(ddim::fill_normal(seed, 0, 0, empty));
}

TEST_CASE("philox: the noise stream is pinned so a seed gives the same image across versions") {
  // Bit patterns of philox_normal(seed 0, stream 0, step 0, elements 0..3) and of a per-step
  // draw. A change here changes every image a seed produces: it needs a format-version bump.
  const ddim::Normal4 z = ddim::philox_normal4(0, ddim::kNoiseStreamInitial, 0, 0);
  const ddim::PhiloxBlock raw = ddim::philox_noise_block(0, 0, 0, 0);
  CHECK(raw.v[0] == 0x6627e8d5u);  // the first known-answer vector
  float z0, z1;
  ddim::philox_box_muller(raw.v[0], raw.v[1], &z0, &z1);
  CHECK(bits(z0) == bits(z.v[0]));
  CHECK(bits(z1) == bits(z.v[1]));
  const double r = std::sqrt(-2.0 * std::log(static_cast<double>(ddim::philox_uniform(raw.v[0]))));
  const double th = 6.283185307179586476925 * ddim::philox_uniform(raw.v[1]);
  CHECK(z.v[0] == doctest::Approx(r * std::cos(th)).epsilon(1e-6));
  CHECK(z.v[1] == doctest::Approx(r * std::sin(th)).epsilon(1e-6));
  char buf[128];
  std::snprintf(buf, sizeof buf, "%08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32 " %08" PRIx32, bits(z.v[0]),
                bits(z.v[1]), bits(z.v[2]), bits(z.v[3]), bits(ddim::philox_normal(7, 1, 3, 12345)));
  CHECK(std::string(buf) == "3f7dbb2f bf6cb6b3 bf1e1ba1 bef6d1a9 be4be920");
}
