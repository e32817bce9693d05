// conv2d (im2col + gemm) and linear (dot products), fp32, NCHW.
//
// conv2d, per sample: the weight (cout, cin*kh*kw) is the gemm's A; the im2col matrix
// (cin*kh*kw, out_h*out_w) is B, built for a band of whole output rows at a time so the scratch
// stays bounded at any resolution; C is the sample's output (cout, out_h*out_w) directly. A 1x1,
// stride-1, unpadded convolution uses the input itself as B. The bias is added after the gemm.
// Each output element is one gemm chain over (ci, ky, kx) in order, so nothing depends on the
// batch size, the band height or the thread count.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {

constexpr std::size_t kMaxColFloats = std::size_t{4} << 20;  // im2col band: at most 16 MiB

bool is_pointwise(const Conv2dShape& s) {
  return s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_t == 0 && s.pad_b == 0 && s.pad_l == 0 &&
         s.pad_r == 0;
}

void check_shape(const Conv2dShape& s) {
  const bool ok = s.n >= 0 && s.cin > 0 && s.h > 0 && s.w > 0 && s.cout > 0 && s.kh > 0 && s.kw > 0 && s.stride_h > 0 &&
                  s.stride_w > 0 && s.pad_t >= 0 && s.pad_b >= 0 && s.pad_l >= 0 && s.pad_r >= 0 &&
                  s.h + s.pad_t + s.pad_b >= s.kh && s.w + s.pad_l + s.pad_r >= s.kw;
  if (!ok)
    throw Error(ErrorCode::InvalidArgument, "cpu conv2d: bad shape (n=" + std::to_string(s.n) +
                                                " cin=" + std::to_string(s.cin) + " h=" + std::to_string(s.h) +
                                                " w=" + std::to_string(s.w) + " cout=" + std::to_string(s.cout) +
                                                " k=" + std::to_string(s.kh) + "x" + std::to_string(s.kw) + ")");
}

// Output rows per im2col band.
int band_rows(const Conv2dShape& s) {
  const std::size_t k = static_cast<std::size_t>(s.cin) * s.kh * s.kw;
  const std::size_t row_floats = k * static_cast<std::size_t>(s.out_w());
  const std::size_t rows = std::max<std::size_t>(1, kMaxColFloats / row_floats);
  return static_cast<int>(std::min<std::size_t>(rows, static_cast<std::size_t>(s.out_h())));
}

// col (K, rows*ow), row r = (ci*kh + ky)*kw + kx, column (oy - oy0)*ow + ox.
void im2col_band(const Conv2dShape& s, const float* x, int oy0, int rows, float* col, ThreadPool* pool) {
  const int ow = s.out_w();
  const int ldcol = rows * ow;
  const int kk = s.kh * s.kw;
  parallel_for(pool, static_cast<std::int64_t>(s.cin) * kk, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      const int ci = static_cast<int>(r / kk);
      const int ky = static_cast<int>(r % kk) / s.kw;
      const int kx = static_cast<int>(r % kk) % s.kw;
      const float* plane = x + static_cast<std::ptrdiff_t>(ci) * s.h * s.w;
      float* dst_row = col + static_cast<std::ptrdiff_t>(r) * ldcol;
      // Valid ox range: 0 <= ox*sw - pad_l + kx < w.
      const int shift = kx - s.pad_l;
      int ox_lo = shift >= 0 ? 0 : (-shift + s.stride_w - 1) / s.stride_w;
      int ox_hi = (s.w - 1 - shift) < 0 ? 0 : (s.w - 1 - shift) / s.stride_w + 1;  // exclusive
      ox_lo = std::min(ox_lo, ow);
      ox_hi = std::clamp(ox_hi, ox_lo, ow);
      for (int i = 0; i < rows; ++i) {
        float* dst = dst_row + static_cast<std::ptrdiff_t>(i) * ow;
        const int iy = (oy0 + i) * s.stride_h - s.pad_t + ky;
        if (iy < 0 || iy >= s.h) {
          std::fill_n(dst, ow, 0.0f);
          continue;
        }
        const float* src = plane + static_cast<std::ptrdiff_t>(iy) * s.w;  // ix = ox*stride_w + shift
        std::fill_n(dst, ox_lo, 0.0f);
        if (s.stride_w == 1) {
          if (ox_hi > ox_lo)
            std::memcpy(dst + ox_lo, src + (ox_lo + shift), static_cast<std::size_t>(ox_hi - ox_lo) * sizeof(float));
        } else {
          for (int ox = ox_lo; ox < ox_hi; ++ox) dst[ox] = src[ox * s.stride_w + shift];
        }
        std::fill_n(dst + ox_hi, ow - ox_hi, 0.0f);
      }
    }
  });
}

}  // namespace

std::size_t conv2d_scratch_floats(const Conv2dShape& s, ThreadPool* /*pool*/) {
  check_shape(s);
  if (is_pointwise(s)) return 0;
  return static_cast<std::size_t>(s.cin) * s.kh * s.kw * static_cast<std::size_t>(band_rows(s)) * s.out_w();
}

void conv2d(const Conv2dShape& s, const float* x, const float* weight, const float* bias, float* y, float* scratch,
            ThreadPool* pool) {
  check_shape(s);
  const int oh = s.out_h(), ow = s.out_w();
  const int k = s.cin * s.kh * s.kw;
  const int plane_out = oh * ow;
  const std::size_t x_sample = static_cast<std::size_t>(s.cin) * s.h * s.w;
  const std::size_t y_sample = static_cast<std::size_t>(s.cout) * plane_out;
  const bool pointwise = is_pointwise(s);
  if (!pointwise && !scratch) throw Error(ErrorCode::InvalidArgument, "cpu conv2d: scratch is required");
  const int band = pointwise ? oh : band_rows(s);

  for (int b = 0; b < s.n; ++b) {
    const float* xs = x + x_sample * static_cast<std::size_t>(b);
    float* ys = y + y_sample * static_cast<std::size_t>(b);
    if (pointwise) {
      gemm(s.cout, plane_out, s.cin, weight, s.cin, xs, s.h * s.w, ys, plane_out, false, pool);
    } else {
      for (int oy0 = 0; oy0 < oh; oy0 += band) {
        const int rows = std::min(band, oh - oy0);
        im2col_band(s, xs, oy0, rows, scratch, pool);
        gemm(s.cout, rows * ow, k, weight, k, scratch, rows * ow, ys + static_cast<std::ptrdiff_t>(oy0) * ow, plane_out,
             false, pool);
      }
    }
    if (bias) {
      parallel_for(pool, s.cout, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t co = begin; co < end; ++co) {
          float* p = ys + co * plane_out;
          const float bv = bias[co];
          for (int i = 0; i < plane_out; ++i) p[i] += bv;
        }
      });
    }
  }
}

namespace {

// Fixed-order dot product: eight interleaved partial sums, combined as a balanced tree.
float dot(const float* a, const float* b, int len) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  for (int j = 0; i < len; ++i, ++j) s[j] += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

void linear(const float* x, int n, int in, const float* weight, const float* bias, int out, float* y,
            ThreadPool* pool) {
  if (n < 0 || in <= 0 || out <= 0)
    throw Error(ErrorCode::InvalidArgument, "cpu linear: bad shape (n=" + std::to_string(n) +
                                                " in=" + std::to_string(in) + " out=" + std::to_string(out) + ")");
  if (n == 0) return;
  parallel_for(pool, out, [&](std::int64_t begin, std::int64_t end) {
    for (int b = 0; b < n; ++b) {
      const float* xr = x + static_cast<std::ptrdiff_t>(b) * in;
      float* yr = y + static_cast<std::ptrdiff_t>(b) * out;
      for (std::int64_t o = begin; o < end; ++o) {
        const float v = dot(xr, weight + o * in, in);
        yr[o] = bias ? v + bias[o] : v;
      }
    }
  });
}

}  // namespace ddim::cpu
