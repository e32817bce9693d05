// Spherical interpolation of x_T and the seeded initial noise (ddim/toolkit.hpp).
#include <algorithm>
#include <cmath>

#include "ddim/error.hpp"
#include "ddim/toolkit.hpp"
#include "kernels/philox.h"
#include "sampler/noise.hpp"

namespace ddim {
namespace {

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::InvalidArgument, "slerp: " + message); }

void check_finite(std::span<const float> v, const char* name) {
  const auto it = std::find_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); });
  if (it != v.end()) invalid(std::string(name) + " holds NaN or Inf (first at element " + std::to_string(it - v.begin()) + ")");
}

}  // namespace

std::vector<float> slerp(std::span<const float> a, std::span<const float> b, double t) {
  if (a.size() != b.size())
    invalid("the two vectors have " + std::to_string(a.size()) + " and " + std::to_string(b.size()) + " elements");
  if (a.empty()) invalid("the vectors are empty");
  if (!(t >= 0.0 && t <= 1.0)) invalid("t must be in [0, 1], got " + std::to_string(t));
  check_finite(a, "a");
  check_finite(b, "b");
  if (t == 0.0) return {a.begin(), a.end()};
  if (t == 1.0) return {b.begin(), b.end()};

  double dot = 0.0, aa = 0.0, bb = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = a[i], y = b[i];
    dot += x * y;
    aa += x * x;
    bb += y * y;
  }
  double wa = 1.0 - t, wb = t;  // linear unless the angle is well defined
  const double norms = std::sqrt(aa) * std::sqrt(bb);
  if (norms > 0.0) {
    const double theta = std::acos(std::clamp(dot / norms, -1.0, 1.0));
    const double s = std::sin(theta);
    if (s >= 1e-6) {
      wa = std::sin((1.0 - t) * theta) / s;
      wb = std::sin(t * theta) / s;
    }
  }
  std::vector<float> out(a.size());
  for (std::size_t i = 0; i < a.size(); ++i) out[i] = static_cast<float>(wa * double(a[i]) + wb * double(b[i]));
  return out;
}

std::vector<float> initial_noise(std::uint64_t seed, std::size_t count) {
  std::vector<float> x(count);
  fill_normal(seed, kNoiseStreamInitial, 0, x);
  return x;
}

}  // namespace ddim
