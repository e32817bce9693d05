// The CPU GEMM core (engine/cpu/gemm_core.hpp): micro-kernels, A packing, the tiled driver, and
// the plain C = A . B of ops.hpp on top of them.
//
// Structure (BLIS/GotoBLAS): A (weights) is packed once into panels of MR rows, k-major; B is
// packed per task and K block into panels of NR columns (kept in L2, one panel in L1 at a time);
// the output is cut into tasks of whole B panels (and, when there are too few to keep every
// thread busy, ranges of A panels) that the pool runs in parallel. Inside a task: for each K block
// of kKc, pack the task's B panels, then for each block of kMcPanels A panels, for each B panel,
// for each A panel, one register-blocked micro-kernel call. Edge tiles (rows past M, columns past
// N or across a segment boundary) go through a local tile so their arithmetic is the interior's.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>
#include <string>

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

constexpr int kMaxMr = 8, kMaxNr = 32;

// ---------------------------------------------------------------- portable kernel: 6 x 8
// GCC/Clang vector extensions (SSE on baseline x86-64, NEON on ARM); multiply then add, never
// contracted (-ffp-contract=off).
typedef float v4f __attribute__((vector_size(16)));

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, v4f v) { std::memcpy(p, &v, sizeof v); }

void kernel_portable(int kc, const void* ap, const void* bp, float* c, long ldc, bool load_c) {
  constexpr int mr = 6, nr = 8;
  const float* a = static_cast<const float*>(ap);
  const float* b = static_cast<const float*>(bp);
  v4f acc[mr][2];
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r) {
    const float* cr = c + r * ldc;
    acc[r][0] = load_c ? load4(cr) : v4f{0, 0, 0, 0};
    acc[r][1] = load_c ? load4(cr + 4) : v4f{0, 0, 0, 0};
  }
  for (int k = 0; k < kc; ++k) {
    const v4f b0 = load4(b), b1 = load4(b + 4);
#pragma GCC unroll 6
    for (int r = 0; r < mr; ++r) {
      const v4f ar = {a[r], a[r], a[r], a[r]};
      acc[r][0] = acc[r][0] + ar * b0;
      acc[r][1] = acc[r][1] + ar * b1;
    }
    a += mr;
    b += nr;
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r) {
    store4(c + r * ldc, acc[r][0]);
    store4(c + r * ldc + 4, acc[r][1]);
  }
}

#if defined(__x86_64__)
// ---------------------------------------------------------------- AVX2 + FMA: 6 x 16 (narrow 6 x 8)
template <int kVecs>  // 8-float vectors per row: 2 (full) or 1 (narrow); b's stride is 16 either way
__attribute__((target("avx2,fma"))) void kernel_avx2(int kc, const void* ap, const void* bp, float* c, long ldc,
                                                     bool load_c) {
  constexpr int mr = 6, nr = 16;
  const float* a = static_cast<const float*>(ap);
  const float* b = static_cast<const float*>(bp);
  __m256 acc[mr][kVecs];
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load_c ? _mm256_loadu_ps(c + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m256 bv[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) bv[v] = _mm256_loadu_ps(b + 8 * v);
#pragma GCC unroll 6
    for (int r = 0; r < mr; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r);
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm256_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += mr;
    b += nr;
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}

// ---------------------------------------------------------------- AVX-512: 8 x 32 (narrow 8 x 16)
template <int kVecs>  // 16-float vectors per row: 2 or 1; b's stride is 32
__attribute__((target("avx512f"))) void kernel_avx512(int kc, const void* ap, const void* bp, float* c, long ldc,
                                                      bool load_c) {
  constexpr int mr = 8, nr = 32;
  const float* a = static_cast<const float*>(ap);
  const float* b = static_cast<const float*>(bp);
  __m512 acc[mr][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load_c ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    __m512 bv[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_fmadd_ps(ar, bv[v], acc[r][v]);
    }
    a += mr;
    b += nr;
  }
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// ---------------------------------------------------------------- AVX512-BF16: 8 x 32 (narrow 8 x 16)
// a: per k pair, 8 rows x (bf16 k, bf16 k+1) as one 32-bit word each; b: per k pair, 32 columns x
// (k, k+1): 64 bf16, two zmm. vdpbf16ps: c += a_k * b_k + a_k+1 * b_k+1 per fp32 lane.
template <int kVecs>
__attribute__((target("avx512f,avx512bf16"))) void kernel_avx512_bf16(int steps, const void* ap, const void* bp,
                                                                      float* c, long ldc, bool load_c) {
  constexpr int mr = 8, nr = 32;
  const std::uint32_t* a = static_cast<const std::uint32_t*>(ap);
  const std::uint16_t* b = static_cast<const std::uint16_t*>(bp);
  __m512 acc[mr][kVecs];
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) acc[r][v] = load_c ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int k = 0; k < steps; ++k) {
    __m512bh bv[kVecs];
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + 32 * v);
#pragma GCC unroll 8
    for (int r = 0; r < mr; ++r) {
      const __m512bh ar = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
#pragma GCC unroll 2
      for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
    }
    a += mr;
    b += 2 * nr;
  }
#pragma GCC unroll 8
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < kVecs; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}
#endif  // __x86_64__

constexpr KernelSpec kPortable{"portable 6x8", Isa::Portable, GemmPrecision::Fp32, 6, 8, kernel_portable, 0, nullptr};
#if defined(__x86_64__)
constexpr KernelSpec kAvx2{"avx2+fma 6x16", Isa::Avx2, GemmPrecision::Fp32, 6, 16, kernel_avx2<2>, 8, kernel_avx2<1>};
constexpr KernelSpec kAvx512{"avx512 8x32", Isa::Avx512, GemmPrecision::Fp32, 8, 32, kernel_avx512<2>, 16,
                             kernel_avx512<1>};
constexpr KernelSpec kAvx512Bf16{"avx512_bf16 8x32", Isa::Avx512Bf16, GemmPrecision::Bf16, 8, 32,
                                 kernel_avx512_bf16<2>, 16, kernel_avx512_bf16<1>};
static_assert(kAvx512.mr <= kMaxMr && kAvx512.nr <= kMaxNr && kAvx2.mr <= kMaxMr && kAvx512Bf16.nr <= kMaxNr);
#endif

#if !defined(__x86_64__)
// ---------------------------------------------------------------- fp32 -> bf16
// Round to nearest even; NaN stays a (quiet) NaN. vdpbf16ps treats bf16 denormals as zero, so
// how a denormal rounds does not matter.
inline std::uint16_t to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// staging (kc x nr fp32) -> dst: per k pair, nr columns x (k, k+1) bf16; an odd last row pairs
// with zero.
void stage_to_bf16_pairs(const float* stage, int kc, int nr, std::uint16_t* dst) {
  for (int k = 0; k < kc; k += 2) {
    const float* r0 = stage + static_cast<std::ptrdiff_t>(k) * nr;
    const float* r1 = k + 1 < kc ? r0 + nr : nullptr;
    std::uint16_t* d = dst + static_cast<std::ptrdiff_t>(k) * nr;  // (k / 2) * 2 * nr
    for (int j = 0; j < nr; ++j) {
      d[2 * j] = to_bf16(r0[j]);
      d[2 * j + 1] = r1 ? to_bf16(r1[j]) : std::uint16_t{0};
    }
  }
}
#endif

#if defined(__x86_64__)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void stage_to_bf16_pairs_avx512(const float* stage, int kc,
                                                                                       int nr, std::uint16_t* dst) {
  // cvtne2ps_pbh(hi, lo) = [bf16(lo[0..15]), bf16(hi[0..15])]; the permutation interleaves them.
  alignas(64) static const std::uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                            8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kInterleave);
  for (int k = 0; k < kc; k += 2) {
    const float* r0 = stage + static_cast<std::ptrdiff_t>(k) * nr;
    std::uint16_t* d = dst + static_cast<std::ptrdiff_t>(k) * nr;
    int j = 0;
    for (; j + 16 <= nr; j += 16) {
      const __m512 lo = _mm512_loadu_ps(r0 + j);
      const __m512 hi = k + 1 < kc ? _mm512_loadu_ps(r0 + nr + j) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm512_storeu_si512(d + 2 * j, _mm512_permutexvar_epi16(idx, both));
    }
    if (j < nr) {  // 8 more columns (nr = 8 for A panels): the same with lanes 8..15 unused
      const __m512 lo = _mm512_maskz_loadu_ps(0xFF, r0 + j);
      const __m512 hi = k + 1 < kc ? _mm512_maskz_loadu_ps(0xFF, r0 + nr + j) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      _mm512_mask_storeu_epi32(d + 2 * j, 0xFF, _mm512_permutexvar_epi16(idx, both));
    }
  }
}
#endif

// ---------------------------------------------------------------- blocking
constexpr int kKc = 256;        // K block (even: bf16 pairs never straddle blocks)
constexpr int kMcPanels = 16;   // A panels per inner block (MC = 16 * MR rows, in L2)
constexpr int kNcPanels = 8;    // at most this many B panels per task (NC = 8 * NR columns)

thread_local AlignedBuffer t_b_block;  // a task's packed B panels for one K block
thread_local AlignedBuffer t_stage;    // bf16: the task's B panels in fp32 before conversion
thread_local PackedA t_a;              // gemm(): A packed per call
thread_local AlignedBuffer t_a_stage;  // pack_a, bf16: one A panel in fp32 before conversion

Isa isa_of(GemmKernel k) {
  switch (k) {
    case GemmKernel::Avx2Fma: return Isa::Avx2;
    case GemmKernel::Avx512: return Isa::Avx512;
    default: return Isa::Portable;
  }
}

std::atomic<GemmKernel> g_selected{GemmKernel::Auto};

// The segment pieces of columns [col0, col0 + cols): fn(segment, first column in segment, count, offset in tile).
template <class Fn>
inline void for_segments(const COut& o, int col0, int cols, Fn&& fn) {
  int j = 0;
  while (j < cols) {
    const int col = col0 + j;
    const int s = col / o.seg, in_seg = col - s * o.seg;
    const int len = std::min(cols - j, o.seg - in_seg);
    fn(s, in_seg, len, j);
    j += len;
  }
}

inline float* c_at(const COut& o, int s, int row, int in_seg) {
  return o.c + s * o.seg_stride + static_cast<std::ptrdiff_t>(row) * o.ldc + in_seg;
}

// The epilogue on rows [row0, row0 + rows) x columns [col0, col0 + cols) of C.
void epilogue(const COut& o, int row0, int rows, int col0, int cols) {
  const bool any = o.bias || o.vec || o.residual || o.divisor != 1.0f;
  if (!any) return;
  for_segments(o, col0, cols, [&](int s, int in_seg, int len, int) {
    for (int r = 0; r < rows; ++r) {
      const int i = row0 + r;
      float* y = c_at(o, s, i, in_seg);
      const float* res = o.residual ? o.residual + (y - o.c) : nullptr;
      if (o.bias) {
        const float b = o.bias[i];
        for (int j = 0; j < len; ++j) y[j] = y[j] + b;
      }
      if (o.vec) {
        const float v = o.vec[s * o.vec_stride + i];
        for (int j = 0; j < len; ++j) y[j] = y[j] + v;
      }
      if (res)
        for (int j = 0; j < len; ++j) y[j] = y[j] + res[j];
      if (o.divisor != 1.0f)
        for (int j = 0; j < len; ++j) y[j] = y[j] / o.divisor;
    }
  });
}

// One micro-tile over one K block.
inline void micro_tile(const KernelSpec& ks, const COut& o, int steps, const void* a, const void* b, int row0, int rows,
                       int col0, int cols, bool load_c) {
  const bool narrow = ks.narrow && cols <= ks.narrow_nr;
  const int width = narrow ? ks.narrow_nr : ks.nr;
  const MicroKernel fn = narrow ? ks.narrow : ks.full;
  const int s0 = col0 / o.seg;
  if (rows == ks.mr && cols == width && (col0 + cols - 1) / o.seg == s0) {
    fn(steps, a, b, c_at(o, s0, row0, col0 - s0 * o.seg), o.ldc, load_c);
    return;
  }
  alignas(64) float tile[kMaxMr * kMaxNr];
  if (load_c) {
    std::fill_n(tile, ks.mr * width, 0.0f);
    for_segments(o, col0, cols, [&](int s, int in_seg, int len, int t) {
      for (int r = 0; r < rows; ++r) std::memcpy(tile + r * width + t, c_at(o, s, row0 + r, in_seg), len * sizeof(float));
    });
  }
  fn(steps, a, b, tile, width, load_c);
  for_segments(o, col0, cols, [&](int s, int in_seg, int len, int t) {
    for (int r = 0; r < rows; ++r) std::memcpy(c_at(o, s, row0 + r, in_seg), tile + r * width + t, len * sizeof(float));
  });
}

void check_cout(const COut& o, int m, int n) {
  if (!o.c || o.seg <= 0 || o.ldc < 1 || (o.seg < n && o.seg_stride == 0) || (o.vec && o.vec_stride < 0) ||
      (o.accumulate && (o.bias || o.vec || o.residual || o.divisor != 1.0f)) || o.divisor == 0.0f)
    throw Error(ErrorCode::InvalidArgument, "cpu gemm: bad output description (M=" + std::to_string(m) +
                                                " N=" + std::to_string(n) + ")");
}

}  // namespace

// ---------------------------------------------------------------- AlignedBuffer
AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    bytes_ = o.bytes_;
    o.data_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void AlignedBuffer::release() noexcept {
  if (data_) ::operator delete[](data_, std::align_val_t{64});
  data_ = nullptr;
  bytes_ = 0;
}

void* AlignedBuffer::get(std::size_t bytes, const char* what) {
  if (bytes > bytes_) {
    release();
    try {
      data_ = ::operator new[](bytes, std::align_val_t{64});
    } catch (const std::bad_alloc&) {
      throw Error(ErrorCode::OutOfMemory,
                  std::string("cpu: could not allocate ") + std::to_string(bytes) + " bytes for " + what);
    }
    bytes_ = bytes;
  }
  return data_;
}

// ---------------------------------------------------------------- kernels
const KernelSpec& kernel_spec(Isa isa, GemmPrecision precision) {
  if (precision == GemmPrecision::Bf16) {
#if defined(__x86_64__)
    bf16_isa(isa);  // throws, naming the missing feature
    return kAvx512Bf16;
#else
    bf16_isa(isa);
#endif
  }
#if defined(__x86_64__)
  switch (isa) {
    case Isa::Portable: return kPortable;
    case Isa::Avx2: return kAvx2;
    default: return kAvx512;
  }
#else
  (void)isa;
  return kPortable;
#endif
}

const KernelSpec& selected_fp32_kernel() {
  GemmKernel k = g_selected.load(std::memory_order_relaxed);
  if (k == GemmKernel::Auto) return kernel_spec(active_isa(), GemmPrecision::Fp32);
  return kernel_spec(isa_of(k), GemmPrecision::Fp32);
}

bool gemm_select_kernel(GemmKernel kernel) {
  if (kernel == GemmKernel::Auto) {
    g_selected.store(GemmKernel::Auto, std::memory_order_relaxed);
    return true;
  }
  // Never above the active level (DDIM_CPU_ISA narrows what the tests may force too).
  if (static_cast<int>(isa_of(kernel)) > static_cast<int>(active_isa()) || !isa_supported(isa_of(kernel)))
    return false;
  g_selected.store(kernel, std::memory_order_relaxed);
  return true;
}

const char* gemm_kernel_name() noexcept {
  try {
    return selected_fp32_kernel().name;
  } catch (const Error&) {
    return "none (DDIM_CPU_ISA is not usable here)";
  }
}

// ---------------------------------------------------------------- packing
void pack_a(const float* a, int m, int k, std::ptrdiff_t row_stride, std::ptrdiff_t col_stride, const KernelSpec& ks,
            PackedA& out, ThreadPool* pool) {
  const int mr = ks.mr, kg = ks.k_group();
  const int k_padded = (k + kg - 1) / kg * kg;
  out.spec = &ks;
  out.m = m;
  out.k = k;
  out.panels = (m + mr - 1) / mr;
  out.panel_elems = static_cast<std::size_t>(k_padded) * mr;
  void* base = out.storage.get(std::max<std::size_t>(1, out.panel_elems * out.panels) * ks.elem_bytes(), "packed weights");
  parallel_for(pool, out.panels, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t p = begin; p < end; ++p) {
      const int row0 = static_cast<int>(p) * mr, rows = std::min(mr, m - row0);
      const float* src = a + row0 * row_stride;
      if (ks.precision == GemmPrecision::Fp32) {
        float* d = static_cast<float*>(base) + out.panel_elems * p;
        for (int kk = 0; kk < k; ++kk, d += mr) {
          for (int r = 0; r < rows; ++r) d[r] = src[r * row_stride + kk * col_stride];
          for (int r = rows; r < mr; ++r) d[r] = 0.0f;
        }
      } else {  // the panel in fp32 (k x mr, zero rows past M), then converted to bf16 pairs
        std::uint16_t* d = static_cast<std::uint16_t*>(base) + out.panel_elems * p;
        float* stage = static_cast<float*>(t_a_stage.get(std::size_t(k_padded) * mr * sizeof(float), "packing weights"));
        for (int kk = 0; kk < k; ++kk) {
          float* row = stage + static_cast<std::ptrdiff_t>(kk) * mr;
          for (int r = 0; r < rows; ++r) row[r] = src[r * row_stride + kk * col_stride];
          for (int r = rows; r < mr; ++r) row[r] = 0.0f;
        }
#if defined(__x86_64__)
        stage_to_bf16_pairs_avx512(stage, k, mr, d);
#else
        stage_to_bf16_pairs(stage, k, mr, d);
#endif
      }
    }
  });
}

void split_runs(int j0, int len, const float* base, int base_step, int a, int b, int b_step, int nr,
                std::size_t panel_stride, std::vector<PackRun>& out) {
  while (len > 0) {
    const int piece = std::min(len, nr - j0 % nr);
    out.push_back(PackRun{static_cast<std::size_t>(j0 / nr) * panel_stride + static_cast<std::size_t>(j0 % nr), piece,
                          base, a, b});
    j0 += piece;
    len -= piece;
    base += static_cast<std::ptrdiff_t>(piece) * base_step;
    b += piece * b_step;
  }
}

namespace {

thread_local std::vector<PackRun> t_runs;

// Zero the columns of the last panel past `cols`.
void zero_tail(int kc, int cols, float* dst, int nr, std::size_t panel_stride) {
  if (cols % nr == 0) return;
  float* last = dst + static_cast<std::size_t>(cols / nr) * panel_stride;
  for (int k = 0; k < kc; ++k)
    for (int j = cols % nr; j < nr; ++j) last[static_cast<std::ptrdiff_t>(k) * nr + j] = 0.0f;
}

void pack_matrix_block(const void* ctx, int k0, int kc, int col0, int cols, float* dst, int nr, std::size_t panel_stride,
                       Isa isa) {
  const MatrixB& m = *static_cast<const MatrixB*>(ctx);
  std::vector<PackRun>& runs = t_runs;
  runs.clear();
  for (int j = 0; j < cols;) {  // segment pieces, cut at panel boundaries
    const int col = col0 + j, s = col / m.seg, in_seg = col - s * m.seg;
    const int len = std::min(cols - j, m.seg - in_seg);
    split_runs(j, len, m.b + s * m.seg_stride + static_cast<std::ptrdiff_t>(k0) * m.ldb + in_seg, 1, 0, 0, 0, nr, panel_stride,
               runs);
    j += len;
  }
  with_isa(isa, [&]() DDIM_INLINE_LAMBDA {
    for (int k = 0; k < kc; ++k) {  // row by row: each row of B is read in order
      for (const PackRun& r : runs) {
        const float* __restrict src = r.base + static_cast<std::ptrdiff_t>(k) * m.ldb;
        float* __restrict d = dst + r.dst + static_cast<std::ptrdiff_t>(k) * nr;
        for (int t = 0; t < r.len; ++t) d[t] = src[t];
      }
    }
  });
  zero_tail(kc, cols, dst, nr, panel_stride);
}

}  // namespace

BSource matrix_source(const MatrixB& m, int k, int n) { return BSource{pack_matrix_block, &m, k, n}; }

// ---------------------------------------------------------------- the driver
void gemm_packed(const PackedA& A, const BSource& B, const COut& o, ThreadPool* pool) {
  const KernelSpec& ks = *A.spec;
  const int M = A.m, K = A.k, N = B.n;
  if (B.k != K) throw Error(ErrorCode::InvalidArgument, "cpu gemm: A has K=" + std::to_string(K) + ", B " + std::to_string(B.k));
  if (M == 0 || N == 0) return;
  check_cout(o, M, N);
  if (K == 0) {  // C = 0 (or C), then the epilogue
    if (!o.accumulate)
      for (int i = 0; i < M; ++i)
        for_segments(o, 0, N, [&](int s, int in_seg, int len, int) { std::fill_n(c_at(o, s, i, in_seg), len, 0.0f); });
    epilogue(o, 0, M, 0, N);
    return;
  }
  const int mr = ks.mr, nr = ks.nr, kg = ks.k_group();
  const std::size_t eb = ks.elem_bytes();
  const int a_panels = A.panels, b_panels = (N + nr - 1) / nr;
  const int threads = pool ? pool->size() : 1;
  // Tasks: runs of B panels; split the A panels too when there are fewer runs than 2 per thread.
  const int nc_panels = std::clamp((b_panels + 2 * threads - 1) / (2 * threads), 1, kNcPanels);
  const int n_blocks = (b_panels + nc_panels - 1) / nc_panels;
  const int m_splits = n_blocks >= 2 * threads ? 1 : std::min(a_panels, (2 * threads + n_blocks - 1) / n_blocks);
  const std::size_t b_panel_elems = static_cast<std::size_t>(kKc) * nr;  // per K block (kKc is even)

  parallel_for(pool, static_cast<std::int64_t>(n_blocks) * m_splits, [&](std::int64_t begin, std::int64_t end) {
    void* b_block = t_b_block.get(b_panel_elems * nc_panels * eb, "gemm packing");
    float* stage = ks.precision == GemmPrecision::Bf16
                       ? static_cast<float*>(t_stage.get(b_panel_elems * nc_panels * sizeof(float), "gemm packing"))
                       : nullptr;
    for (std::int64_t t = begin; t < end; ++t) {
      const int nb = static_cast<int>(t / m_splits), ms = static_cast<int>(t % m_splits);
      const int q0 = nb * nc_panels, q1 = std::min(b_panels, q0 + nc_panels);
      const int p0 = static_cast<int>(static_cast<std::int64_t>(ms) * a_panels / m_splits);
      const int p1 = static_cast<int>(static_cast<std::int64_t>(ms + 1) * a_panels / m_splits);
      for (int k0 = 0; k0 < K; k0 += kKc) {
        const int kc = std::min(kKc, K - k0);
        const int steps = (kc + kg - 1) / kg;
        {
          const int col0 = q0 * nr, cols = std::min(N, q1 * nr) - col0;
          if (ks.precision == GemmPrecision::Fp32) {
            B.pack(B.ctx, k0, kc, col0, cols, static_cast<float*>(b_block), nr, b_panel_elems, ks.isa);
          } else if (B.pack_bf16) {
            B.pack_bf16(B.ctx, k0, kc, col0, cols, static_cast<std::uint16_t*>(b_block), nr, b_panel_elems);
          } else {  // fp32 into the stage, then each panel converted to bf16 pairs
            B.pack(B.ctx, k0, kc, col0, cols, stage, nr, b_panel_elems, ks.isa);
            for (int q = q0; q < q1; ++q) {
              const float* sp = stage + b_panel_elems * (q - q0);
              std::uint16_t* d = static_cast<std::uint16_t*>(b_block) + b_panel_elems * (q - q0);
#if defined(__x86_64__)
              stage_to_bf16_pairs_avx512(sp, kc, nr, d);
#else
              stage_to_bf16_pairs(sp, kc, nr, d);
#endif
            }
          }
        }
        const bool load_c = o.accumulate || k0 > 0, last = k0 + kc >= K;
        for (int pb = p0; pb < p1; pb += kMcPanels) {
          const int pe = std::min(p1, pb + kMcPanels);
          for (int q = q0; q < q1; ++q) {
            const int col0 = q * nr, cols = std::min(nr, N - col0);
            const char* bp = static_cast<const char*>(b_block) + b_panel_elems * (q - q0) * eb;
            for (int p = pb; p < pe; ++p) {
              const int row0 = p * mr, rows = std::min(mr, M - row0);
              const char* ap = static_cast<const char*>(A.data()) + (A.panel_elems * p + static_cast<std::size_t>(k0) * mr) * eb;
              micro_tile(ks, o, steps, ap, bp, row0, rows, col0, cols, load_c);
              if (last) epilogue(o, row0, rows, col0, cols);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------- plain gemm (ops.hpp)
void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate,
          ThreadPool* pool) {
  if (M < 0 || N < 0 || K < 0 || lda < std::max(K, 1) || ldb < std::max(N, 1) || ldc < std::max(N, 1))
    throw Error(ErrorCode::InvalidArgument, "cpu gemm: bad sizes M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                                " K=" + std::to_string(K) + " lda=" + std::to_string(lda) +
                                                " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc));
  if (M == 0 || N == 0) return;
  gemm_general(M, N, K, A, lda, 1, B, ldb, C, ldc, accumulate, selected_fp32_kernel(), pool);
}

void gemm_general(int M, int N, int K, const float* A, std::ptrdiff_t a_row_stride, std::ptrdiff_t a_col_stride,
                  const float* B, long ldb, float* C, long ldc, bool accumulate, const KernelSpec& ks, ThreadPool* pool) {
  pack_a(A, M, K, a_row_stride, a_col_stride, ks, t_a, pool);
  const MatrixB mb{B, ldb, N, 0};
  COut o;
  o.c = C;
  o.ldc = ldc;
  o.seg = N;
  o.accumulate = accumulate;
  gemm_packed(t_a, matrix_source(mb, K, N), o, pool);
}

}  // namespace ddim::cpu
