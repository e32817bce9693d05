// Element-wise and data-movement ops, fp32, NCHW, plus the sinusoidal timestep embedding.
// Plain loops in a fixed order; every element depends on its own sample only.
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "cpu/ops.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

void silu(const float* x, std::size_t count, float* y) {
  for (std::size_t i = 0; i < count; ++i) y[i] = x[i] / (1.0f + std::exp(-x[i]));
}

void add(const float* a, const float* b, std::size_t count, float divisor, float* y) {
  if (divisor == 1.0f) {
    for (std::size_t i = 0; i < count; ++i) y[i] = a[i] + b[i];
  } else {
    for (std::size_t i = 0; i < count; ++i) y[i] = (a[i] + b[i]) / divisor;
  }
}

void add_broadcast(const float* a, const float* b, int n, int c, int hw, float divisor, float* y) {
  const std::size_t planes = static_cast<std::size_t>(n) * static_cast<std::size_t>(c);
  for (std::size_t p = 0; p < planes; ++p) {
    const float bv = b[p];
    const float* ap = a + p * static_cast<std::size_t>(hw);
    float* yp = y + p * static_cast<std::size_t>(hw);
    if (divisor == 1.0f) {
      for (int i = 0; i < hw; ++i) yp[i] = ap[i] + bv;
    } else {
      for (int i = 0; i < hw; ++i) yp[i] = (ap[i] + bv) / divisor;
    }
  }
}

void scale_shift(const float* x, std::size_t count, float scale, float shift, float* y) {
  for (std::size_t i = 0; i < count; ++i) y[i] = x[i] * scale + shift;
}

void concat_channels(const float* const* xs, const int* cs, int count, int n, int hw, float* y) {
  std::size_t c_total = 0;
  for (int i = 0; i < count; ++i) c_total += static_cast<std::size_t>(cs[i]);
  for (int b = 0; b < n; ++b) {
    float* dst = y + static_cast<std::size_t>(b) * c_total * static_cast<std::size_t>(hw);
    for (int i = 0; i < count; ++i) {
      const std::size_t len = static_cast<std::size_t>(cs[i]) * static_cast<std::size_t>(hw);
      if (len) std::memcpy(dst, xs[i] + static_cast<std::size_t>(b) * len, len * sizeof(float));
      dst += len;
    }
  }
}

void upsample_nearest2x(const float* x, int n, int c, int h, int w, float* y) {
  const std::size_t planes = static_cast<std::size_t>(n) * static_cast<std::size_t>(c);
  const std::size_t in_plane = static_cast<std::size_t>(h) * w, out_plane = in_plane * 4;
  const int w2 = 2 * w;
  for (std::size_t p = 0; p < planes; ++p) {
    const float* xp = x + p * in_plane;
    float* yp = y + p * out_plane;
    for (int iy = 0; iy < h; ++iy) {
      const float* src = xp + static_cast<std::size_t>(iy) * w;
      float* dst = yp + static_cast<std::size_t>(2 * iy) * w2;
      for (int ix = 0; ix < w; ++ix) dst[2 * ix] = dst[2 * ix + 1] = src[ix];
      std::memcpy(dst + w2, dst, static_cast<std::size_t>(w2) * sizeof(float));
    }
  }
}

void avg_pool2x(const float* x, int n, int c, int h, int w, float* y) {
  const std::size_t planes = static_cast<std::size_t>(n) * static_cast<std::size_t>(c);
  const int oh = h / 2, ow = w / 2;
  for (std::size_t p = 0; p < planes; ++p) {
    const float* xp = x + p * static_cast<std::size_t>(h) * w;
    float* yp = y + p * static_cast<std::size_t>(oh) * ow;
    for (int oy = 0; oy < oh; ++oy) {
      const float* r0 = xp + static_cast<std::size_t>(2 * oy) * w;
      const float* r1 = r0 + w;
      for (int ox = 0; ox < ow; ++ox) {
        // PyTorch's order: the window row by row, then divide by the window size.
        const float s = ((r0[2 * ox] + r0[2 * ox + 1]) + r1[2 * ox]) + r1[2 * ox + 1];
        yp[static_cast<std::size_t>(oy) * ow + ox] = s / 4.0f;
      }
    }
  }
}

// Mirrors diffusers' get_timestep_embedding step by step in float32:
//   exponent = -math.log(max_period) * arange(half, float32)    (python float -> float32 multiply)
//   exponent = exponent / (half - downscale_freq_shift)          (python float divisor)
//   emb = exp(exponent); emb = t[:, None].float() * emb[None]; emb = scale * emb
//   emb = cat([sin(emb), cos(emb)]); flip to [cos, sin]; zero-pad an odd dim.
void timestep_embedding(const float* t, int n, int dim, bool flip_sin_to_cos, float freq_shift, float max_period,
                        float scale, float* y) {
  if (n < 0 || dim <= 0)
    throw Error(ErrorCode::InvalidArgument, "cpu timestep_embedding: bad dim " + std::to_string(dim));
  const int half = dim / 2;
  const float neg_log = static_cast<float>(-std::log(static_cast<double>(max_period)));
  const float divisor = static_cast<float>(static_cast<double>(half) - static_cast<double>(freq_shift));
  for (int b = 0; b < n; ++b) {
    float* row = y + static_cast<std::size_t>(b) * dim;
    float* first = row;          // sin (cos when flipped)
    float* second = row + half;  // cos (sin when flipped)
    if (flip_sin_to_cos) std::swap(first, second);
    for (int i = 0; i < half; ++i) {
      float exponent = neg_log * static_cast<float>(i);
      exponent = exponent / divisor;
      const float freq = std::exp(exponent);
      float arg = t[b] * freq;
      arg = scale * arg;
      first[i] = std::sin(arg);
      second[i] = std::cos(arg);
    }
    if (dim % 2 == 1) row[dim - 1] = 0.0f;
  }
}

}  // namespace ddim::cpu
