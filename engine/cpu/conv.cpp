// conv2d (implicit im2col + gemm) and linear (dot products), fp32, NCHW.
//
// conv2d is one gemm over the whole batch: A is the weight (cout, cin*kh*kw), packed once (by the
// executor, or per call); B is the im2col matrix of every sample side by side (column j: sample
// j / (oh*ow), output pixel j % (oh*ow)), never stored: the gemm's B packer gathers each panel of
// it straight from the input, zero-filling the padding. C is the NCHW output, written through the
// epilogue: y = ((conv + bias) + temb[n][co]) + residual. Each output element is one gemm chain
// over (ci, ky, kx) in order and then the epilogue's adds in that order (the order of the
// separate ops they replace), so nothing depends on the batch size, the sample's position in it,
// or the thread count.
#include <algorithm>
#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/gemm_core.hpp"
#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/vec_math.hpp"
#include "ddim/error.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ddim::cpu {

namespace {

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

struct Im2col {
  const Conv2dShape* s;
  const float* x;
};

thread_local std::vector<PackRun> t_runs;

// The block's columns as runs of consecutive output pixels on one output row of one sample,
// cut at panel boundaries; a = input row, b = input column of the run's first pixel at ky = kx = 0.
const std::vector<PackRun>& im2col_runs(const Im2col& ic, int col0, int cols, int nr, std::size_t panel_stride) {
  const Conv2dShape& s = *ic.s;
  const int ow = s.out_w(), plane = s.out_h() * ow;
  std::vector<PackRun>& runs = t_runs;
  runs.clear();
  for (int j = 0; j < cols;) {
    const int col = col0 + j, n = col / plane, pix = col - n * plane, oy = pix / ow, ox = pix - oy * ow;
    const int len = std::min(cols - j, ow - ox);
    split_runs(j, len, ic.x + static_cast<std::ptrdiff_t>(n) * s.cin * s.h * s.w, 0, oy * s.stride_h - s.pad_t,
               ox * s.stride_w - s.pad_l, s.stride_w, nr, panel_stride, runs);
    j += len;
  }
  return runs;
}

// Advances (ci, ky, kx) to the next im2col row.
inline void next_row(const Conv2dShape& s, int& ci, int& ky, int& kx) {
  if (++kx == s.kw) {
    kx = 0;
    if (++ky == s.kh) ky = 0, ++ci;
  }
}

#if defined(__x86_64__)
// One run (at most one 32-column panel row) of im2col row (ci, ky, kx), stride 1, as two vectors of
// 16 columns: masked loads, zero where the run leaves the input (the lanes outside the row are
// never read).
struct RunRows {
  __m512 lo, hi;
};
__attribute__((target("avx512f"), always_inline)) inline RunRows load_run(const Conv2dShape& s, const PackRun& run,
                                                                         std::ptrdiff_t plane_offset, int ky, int kx) {
  RunRows v{_mm512_setzero_ps(), _mm512_setzero_ps()};
  const int iy = run.a + ky;
  if (iy < 0 || iy >= s.h) return v;
  const int ix0 = run.b + kx;  // input column of the run's first pixel; valid t: 0 <= ix0 + t < w
  const int lo = std::clamp(-ix0, 0, run.len), hi = std::clamp(s.w - ix0, lo, run.len);
  const std::uint64_t mask = ((std::uint64_t{1} << hi) - 1) & ~((std::uint64_t{1} << lo) - 1);
  // The address of lane 0 may lie left of the row (ix0 < 0): it is formed as an integer and
  // only the masked lanes, all inside the row, are read.
  const float* row = run.base + (plane_offset + iy) * s.w;
  const auto lane0 = reinterpret_cast<std::uintptr_t>(row) + static_cast<std::uintptr_t>(static_cast<std::intptr_t>(ix0) * 4);
  v.lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), reinterpret_cast<const float*>(lane0));
  if (hi > 16) v.hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), reinterpret_cast<const float*>(lane0 + 64));
  return v;
}

// The stride-1 rows of a B block for 32-column panels with AVX-512: two masked loads and two
// stores per run. The same values as the generic loop below.
__attribute__((target("avx512f"))) void pack_stride1_avx512(const Conv2dShape& s, const std::vector<PackRun>& runs,
                                                            int k0, int kc, float* dst) {
  constexpr int nr = 32;
  const int kk = s.kh * s.kw;
  int ci = k0 / kk, ky = (k0 % kk) / s.kw, kx = k0 % s.kw;
  for (int k = 0; k < kc; ++k, next_row(s, ci, ky, kx)) {
    const std::ptrdiff_t plane_offset = static_cast<std::ptrdiff_t>(ci) * s.h;
    for (const PackRun& run : runs) {
      float* d = dst + run.dst + static_cast<std::ptrdiff_t>(k) * nr;
      const RunRows v = load_run(s, run, plane_offset, ky, kx);
      if (run.len == nr) {
        _mm512_storeu_ps(d, v.lo);
        _mm512_storeu_ps(d + 16, v.hi);
      } else {
        const std::uint64_t len_mask = (std::uint64_t{1} << run.len) - 1;
        _mm512_mask_storeu_ps(d, static_cast<__mmask16>(len_mask), v.lo);
        if (run.len > 16) _mm512_mask_storeu_ps(d + 16, static_cast<__mmask16>(len_mask >> 16), v.hi);
      }
    }
  }
}

// The same block straight in bf16 pairs: rows k and k+1 of a run loaded, rounded to bf16
// (vcvtne2ps2bf16, nearest even) and interleaved column by column.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void pack_stride1_bf16(const Conv2dShape& s,
                                                                              const std::vector<PackRun>& runs, int k0,
                                                                              int kc, int cols, std::uint16_t* dst,
                                                                              std::size_t panel_stride) {
  constexpr int nr = 32;
  alignas(64) static const std::uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  const int kk = s.kh * s.kw;
  int ci = k0 / kk, ky = (k0 % kk) / s.kw, kx = k0 % s.kw;
  for (int k = 0; k < kc; k += 2) {
    const int ci0 = ci, ky0 = ky, kx0 = kx;
    next_row(s, ci, ky, kx);
    const bool second = k + 1 < kc;
    for (const PackRun& run : runs) {
      const RunRows a = load_run(s, run, static_cast<std::ptrdiff_t>(ci0) * s.h, ky0, kx0);
      const RunRows b = second ? load_run(s, run, static_cast<std::ptrdiff_t>(ci) * s.h, ky, kx)
                               : RunRows{_mm512_setzero_ps(), _mm512_setzero_ps()};
      const __m512i lo = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b.lo, a.lo));
      const __m512i hi = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b.hi, a.hi));
      const std::size_t col = run.dst % nr;  // the run's first column in its panel
      std::uint16_t* d = dst + (run.dst - col) + static_cast<std::ptrdiff_t>(k) * nr + 2 * col;
      if (run.len == nr) {
        _mm512_storeu_si512(d, lo);
        _mm512_storeu_si512(d + 32, hi);
      } else {
        const std::uint64_t len_mask = (std::uint64_t{1} << run.len) - 1;
        _mm512_mask_storeu_epi32(d, static_cast<__mmask16>(len_mask), lo);
        if (run.len > 16) _mm512_mask_storeu_epi32(d + 32, static_cast<__mmask16>(len_mask >> 16), hi);
      }
    }
    if (second) next_row(s, ci, ky, kx);
  }
  if (cols % nr) {  // the last panel's columns past cols: zero pairs
    std::uint32_t* last = reinterpret_cast<std::uint32_t*>(dst + static_cast<std::size_t>(cols / nr) * panel_stride);
    for (int k = 0; k < kc; k += 2)
      for (int j = cols % nr; j < nr; ++j) last[static_cast<std::ptrdiff_t>(k / 2) * nr + j] = 0;
  }
}
#endif

// B block: rows k0..k0+kc-1 of the im2col matrix, columns col0..col0+cols-1, in panels of nr.
void pack_im2col_block(const void* ctx, int k0, int kc, int col0, int cols, float* dst, int nr, std::size_t panel_stride,
                       Isa isa) {
  const Im2col& ic = *static_cast<const Im2col*>(ctx);
  const Conv2dShape& s = *ic.s;
  const int kk = s.kh * s.kw;
  const std::vector<PackRun>& runs = im2col_runs(ic, col0, cols, nr, panel_stride);
#if defined(__x86_64__)
  if (isa >= Isa::Avx512 && nr == 32 && s.stride_w == 1) {
    pack_stride1_avx512(s, runs, k0, kc, dst);
  } else
#endif
  with_isa(isa, [&]() DDIM_INLINE_LAMBDA {
    int ci = k0 / kk, ky = (k0 % kk) / s.kw, kx = k0 % s.kw;  // of row k, advanced without divisions
    for (int k = 0; k < kc; ++k) {
      const std::ptrdiff_t plane_offset = static_cast<std::ptrdiff_t>(ci) * s.h;
      for (const PackRun& run : runs) {
        float* __restrict d = dst + run.dst + static_cast<std::ptrdiff_t>(k) * nr;
        const int iy = run.a + ky;
        if (iy < 0 || iy >= s.h) {
          for (int t = 0; t < run.len; ++t) d[t] = 0.0f;
          continue;
        }
        const float* __restrict src = run.base + (plane_offset + iy) * s.w;
        const int ix0 = run.b + kx;  // input column of the run's first pixel
        if (s.stride_w == 1) {  // valid t: 0 <= ix0 + t < w
          const int lo = std::clamp(-ix0, 0, run.len), hi = std::clamp(s.w - ix0, lo, run.len);
          const float* __restrict sp = src + ix0;
          for (int t = 0; t < lo; ++t) d[t] = 0.0f;
          for (int t = lo; t < hi; ++t) d[t] = sp[t];
          for (int t = hi; t < run.len; ++t) d[t] = 0.0f;
        } else {
          for (int t = 0; t < run.len; ++t) {
            const int ix = ix0 + t * s.stride_w;
            d[t] = ix >= 0 && ix < s.w ? src[ix] : 0.0f;
          }
        }
      }
      next_row(s, ci, ky, kx);
    }
  });
  if (cols % nr) {  // the last panel's columns past cols
    float* last = dst + static_cast<std::size_t>(cols / nr) * panel_stride;
    for (int k = 0; k < kc; ++k)
      for (int j = cols % nr; j < nr; ++j) last[static_cast<std::ptrdiff_t>(k) * nr + j] = 0.0f;
  }
}

#if defined(__x86_64__)
// B block in bf16 pairs (BSource::pack_bf16), for stride-1 convolutions and 32-column panels.
void pack_im2col_block_bf16(const void* ctx, int k0, int kc, int col0, int cols, std::uint16_t* dst, int nr,
                            std::size_t panel_stride) {
  const Im2col& ic = *static_cast<const Im2col*>(ctx);
  pack_stride1_bf16(*ic.s, im2col_runs(ic, col0, cols, nr, panel_stride), k0, kc, cols, dst, panel_stride);
}
#endif

}  // namespace

void pack_conv_weights(const Conv2dShape& s, const float* weight, const KernelSpec& spec, PackedA& out,
                       ThreadPool* pool) {
  check_shape(s);
  const int k = s.cin * s.kh * s.kw;
  pack_a(weight, s.cout, k, k, 1, spec, out, pool);
}

void conv2d_packed(const Conv2dShape& s, const float* x, const PackedA& w, const ConvEpilogue& e, float* y,
                   ThreadPool* pool) {
  check_shape(s);
  const int k = s.cin * s.kh * s.kw, plane = s.out_h() * s.out_w();
  if (w.m != s.cout || w.k != k)
    throw Error(ErrorCode::InvalidArgument, "cpu conv2d: packed weights are " + std::to_string(w.m) + " x " +
                                                std::to_string(w.k) + ", the shape needs " + std::to_string(s.cout) +
                                                " x " + std::to_string(k));
  if (e.residual && e.residual == y) throw Error(ErrorCode::InvalidArgument, "cpu conv2d: the residual may not alias y");
  if (s.n == 0) return;
  if (static_cast<long long>(s.n) * plane > (1LL << 30))
    throw Error(ErrorCode::InvalidArgument, "cpu conv2d: batch x output pixels is too large");
  const Im2col ic{&s, x};
  BSource b{pack_im2col_block, &ic, k, static_cast<int>(static_cast<long long>(s.n) * plane)};
  const bool pointwise = s.kh == 1 && s.kw == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_t == 0 && s.pad_b == 0 &&
                         s.pad_l == 0 && s.pad_r == 0;
  const MatrixB mb{x, plane, plane, static_cast<std::ptrdiff_t>(s.cin) * plane};
  if (w.spec->precision == GemmPrecision::Bf16) {
#if defined(__x86_64__)
    if (s.stride_w == 1 && w.spec->nr == 32) b.pack_bf16 = pack_im2col_block_bf16;  // no fp32 staging
#endif
  } else if (pointwise) {
    b = matrix_source(mb, k, b.n);  // the input itself, sample by sample
  }
  COut o;
  o.c = y;
  o.ldc = plane;
  o.seg = plane;
  o.seg_stride = static_cast<std::ptrdiff_t>(s.cout) * plane;
  o.bias = e.bias;
  o.vec = e.temb;
  o.vec_stride = s.cout;
  o.residual = e.residual;
  gemm_packed(w, b, o, pool);
}

void conv2d(const Conv2dShape& s, const float* x, const float* weight, const float* bias, float* y, ThreadPool* pool) {
  thread_local PackedA packed;
  pack_conv_weights(s, weight, selected_fp32_kernel(), packed, pool);
  ConvEpilogue e;
  e.bias = bias;
  conv2d_packed(s, x, packed, e, y, pool);
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
