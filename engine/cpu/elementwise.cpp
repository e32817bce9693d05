// Element-wise and data-movement ops, fp32, NCHW, plus the sinusoidal timestep embedding.
// Plain loops; every element depends on its own inputs only, so splitting the work over the
// pool (in blocks of whole planes or of kBlock elements) changes nothing. SiLU uses exp_f32
// (engine/cpu/vec_math.hpp).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <string>
#include <utility>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/vec_math.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {

constexpr std::int64_t kBlock = 16384;  // elements per task of the flat element-wise ops

// fn(begin, end) over [0, count) in blocks of kBlock on the pool.
template <class Fn>
void for_blocks(ThreadPool* pool, std::size_t count, Fn&& fn) {
  const std::int64_t blocks = static_cast<std::int64_t>((count + kBlock - 1) / kBlock);
  parallel_for(pool, blocks, [&](std::int64_t b0, std::int64_t b1) {
    fn(static_cast<std::size_t>(b0 * kBlock), std::min(count, static_cast<std::size_t>(b1 * kBlock)));
  });
}

}  // namespace

void silu(const float* x, std::size_t count, float* y, ThreadPool* pool) {
  const Isa isa = active_isa();
  for_blocks(pool, count, [&](std::size_t b, std::size_t e) {
    with_isa(isa, [&]() DDIM_INLINE_LAMBDA {
      map16(x + b, y + b, e - b, [](auto v) DDIM_INLINE_LAMBDA { return silu_f32(v); });
    });
  });
}

void add(const float* a, const float* b, std::size_t count, float divisor, float* y, ThreadPool* pool) {
  for_blocks(pool, count, [&](std::size_t s, std::size_t e) {
    if (divisor == 1.0f) {
      for (std::size_t i = s; i < e; ++i) y[i] = a[i] + b[i];
    } else {
      for (std::size_t i = s; i < e; ++i) y[i] = (a[i] + b[i]) / divisor;
    }
  });
}

void add_broadcast(const float* a, const float* b, int n, int c, int hw, float divisor, float* y, ThreadPool* pool) {
  const std::int64_t planes = static_cast<std::int64_t>(n) * c;
  parallel_for(pool, planes, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const float bv = b[p];
      const float* ap = a + p * hw;
      float* yp = y + p * hw;
      if (divisor == 1.0f) {
        for (int i = 0; i < hw; ++i) yp[i] = ap[i] + bv;
      } else {
        for (int i = 0; i < hw; ++i) yp[i] = (ap[i] + bv) / divisor;
      }
    }
  });
}

void scale_shift(const float* x, std::size_t count, float scale, float shift, float* y, ThreadPool* pool) {
  for_blocks(pool, count, [&](std::size_t b, std::size_t e) {
    for (std::size_t i = b; i < e; ++i) y[i] = x[i] * scale + shift;
  });
}

void concat_channels(const float* const* xs, const int* cs, int count, int n, int hw, float* y, ThreadPool* pool) {
  std::size_t c_total = 0;
  for (int i = 0; i < count; ++i) c_total += static_cast<std::size_t>(cs[i]);
  parallel_for(pool, static_cast<std::int64_t>(n) * count, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const int b = static_cast<int>(t / count), i = static_cast<int>(t % count);
      std::size_t c_before = 0;
      for (int j = 0; j < i; ++j) c_before += static_cast<std::size_t>(cs[j]);
      const std::size_t len = static_cast<std::size_t>(cs[i]) * static_cast<std::size_t>(hw);
      float* dst = y + (static_cast<std::size_t>(b) * c_total + c_before) * static_cast<std::size_t>(hw);
      if (len) std::memcpy(dst, xs[i] + static_cast<std::size_t>(b) * len, len * sizeof(float));
    }
  });
}

void upsample_nearest2x(const float* x, int n, int c, int h, int w, float* y, ThreadPool* pool) {
  const std::size_t in_plane = static_cast<std::size_t>(h) * w, out_plane = in_plane * 4;
  const int w2 = 2 * w;
  parallel_for(pool, static_cast<std::int64_t>(n) * c, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const float* xp = x + static_cast<std::size_t>(p) * in_plane;
      float* yp = y + static_cast<std::size_t>(p) * out_plane;
      for (int iy = 0; iy < h; ++iy) {
        const float* src = xp + static_cast<std::size_t>(iy) * w;
        float* dst = yp + static_cast<std::size_t>(2 * iy) * w2;
        for (int ix = 0; ix < w; ++ix) dst[2 * ix] = dst[2 * ix + 1] = src[ix];
        std::memcpy(dst + w2, dst, static_cast<std::size_t>(w2) * sizeof(float));
      }
    }
  });
}

void avg_pool2x(const float* x, int n, int c, int h, int w, float* y, ThreadPool* pool) {
  const int oh = h / 2, ow = w / 2;
  parallel_for(pool, static_cast<std::int64_t>(n) * c, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const float* xp = x + static_cast<std::size_t>(p) * h * w;
      float* yp = y + static_cast<std::size_t>(p) * oh * ow;
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
  });
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
