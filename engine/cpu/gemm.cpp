// C[M,N] (+)= A[M,K] * B[K,N], fp32, row-major with leading dimensions.
//
// Algorithm (the BLIS/GotoBLAS structure): A is packed into panels of MR rows and B into panels
// of NR columns, each panel k-major over the whole of K (zero padded past M / N). The output is
// cut into tiles of at most MC x NC that the pool computes in parallel; inside a tile the loops
// run over K blocks of KC (B micro-panel kept in L1, the A block in L2) and call a
// register-blocked MR x NR micro-kernel.
//
// Determinism: every output element is one chain c = fma(a_k, b_k, c) (or c = c + a_k*b_k in the
// portable kernel) over k = 0..K-1 in order, starting from 0 (or from C when accumulating); the
// chain is stored and reloaded between K blocks, which is exact. So an element's value does not
// depend on M, N, the tiling, the thread count or whether its tile is full or on an edge. The
// kernel is picked once per process from the CPU's features, never from the problem size; the
// AVX2 and AVX-512 kernels compute the same chain and so agree bitwise.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstring>
#include <new>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ddim::cpu {

namespace {

// The micro-kernel: c[MR x NR] (ldc) = (load_c ? c : 0) + a_panel * b_panel over kc steps.
// a: kc x MR (k-major), b: kc x NR (k-major).
using MicroKernel = void (*)(int kc, const float* a, const float* b, float* c, int ldc, bool load_c);

struct KernelInfo {
  GemmKernel id;
  const char* name;
  int mr, nr;
  MicroKernel fn;
};

constexpr int kMaxMr = 8, kMaxNr = 32;

// ---------------------------------------------------------------- portable kernel: 6 x 8
// GCC/Clang vector extensions (SSE on baseline x86-64, NEON on ARM); multiply then add, never
// contracted (-ffp-contract=off).
constexpr int kGenericMr = 6, kGenericNr = 8;
typedef float v4f __attribute__((vector_size(16)));

inline v4f load4(const float* p) {
  v4f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store4(float* p, v4f v) { std::memcpy(p, &v, sizeof v); }

void kernel_generic(int kc, const float* a, const float* b, float* c, int ldc, bool load_c) {
  v4f acc[kGenericMr][2];
#pragma GCC unroll 6
  for (int r = 0; r < kGenericMr; ++r) {
    const float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    acc[r][0] = load_c ? load4(cr) : v4f{0, 0, 0, 0};
    acc[r][1] = load_c ? load4(cr + 4) : v4f{0, 0, 0, 0};
  }
  for (int k = 0; k < kc; ++k) {
    const v4f b0 = load4(b), b1 = load4(b + 4);
#pragma GCC unroll 6
    for (int r = 0; r < kGenericMr; ++r) {
      const v4f ar = {a[r], a[r], a[r], a[r]};
      acc[r][0] = acc[r][0] + ar * b0;
      acc[r][1] = acc[r][1] + ar * b1;
    }
    a += kGenericMr;
    b += kGenericNr;
  }
#pragma GCC unroll 6
  for (int r = 0; r < kGenericMr; ++r) {
    float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    store4(cr, acc[r][0]);
    store4(cr + 4, acc[r][1]);
  }
}

#if defined(__x86_64__)
// ---------------------------------------------------------------- AVX2 + FMA kernel: 6 x 16
constexpr int kAvx2Mr = 6, kAvx2Nr = 16;

__attribute__((target("avx2,fma"))) void kernel_avx2(int kc, const float* a, const float* b, float* c, int ldc,
                                                     bool load_c) {
  __m256 acc[kAvx2Mr][2];
#pragma GCC unroll 6
  for (int r = 0; r < kAvx2Mr; ++r) {
    float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    acc[r][0] = load_c ? _mm256_loadu_ps(cr) : _mm256_setzero_ps();
    acc[r][1] = load_c ? _mm256_loadu_ps(cr + 8) : _mm256_setzero_ps();
  }
  for (int k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b);
    const __m256 b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int r = 0; r < kAvx2Mr; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r);
      acc[r][0] = _mm256_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ar, b1, acc[r][1]);
    }
    a += kAvx2Mr;
    b += kAvx2Nr;
  }
#pragma GCC unroll 6
  for (int r = 0; r < kAvx2Mr; ++r) {
    float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    _mm256_storeu_ps(cr, acc[r][0]);
    _mm256_storeu_ps(cr + 8, acc[r][1]);
  }
}

// ---------------------------------------------------------------- AVX-512 kernel: 8 x 32
constexpr int kAvx512Mr = 8, kAvx512Nr = 32;

__attribute__((target("avx512f"))) void kernel_avx512(int kc, const float* a, const float* b, float* c, int ldc,
                                                      bool load_c) {
  __m512 acc[kAvx512Mr][2];
#pragma GCC unroll 8
  for (int r = 0; r < kAvx512Mr; ++r) {
    float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    acc[r][0] = load_c ? _mm512_loadu_ps(cr) : _mm512_setzero_ps();
    acc[r][1] = load_c ? _mm512_loadu_ps(cr + 16) : _mm512_setzero_ps();
  }
  for (int k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b);
    const __m512 b1 = _mm512_loadu_ps(b + 16);
#pragma GCC unroll 8
    for (int r = 0; r < kAvx512Mr; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(ar, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ar, b1, acc[r][1]);
    }
    a += kAvx512Mr;
    b += kAvx512Nr;
  }
#pragma GCC unroll 8
  for (int r = 0; r < kAvx512Mr; ++r) {
    float* cr = c + static_cast<std::ptrdiff_t>(r) * ldc;
    _mm512_storeu_ps(cr, acc[r][0]);
    _mm512_storeu_ps(cr + 16, acc[r][1]);
  }
}

static_assert(kAvx2Mr <= kMaxMr && kAvx512Mr <= kMaxMr && kAvx2Nr <= kMaxNr && kAvx512Nr <= kMaxNr);
#endif  // __x86_64__
static_assert(kGenericMr <= kMaxMr && kGenericNr <= kMaxNr);

constexpr KernelInfo kKernels[] = {
    {GemmKernel::Portable, "portable 6x8", kGenericMr, kGenericNr, kernel_generic},
#if defined(__x86_64__)
    {GemmKernel::Avx2Fma, "avx2+fma 6x16", kAvx2Mr, kAvx2Nr, kernel_avx2},
    {GemmKernel::Avx512, "avx512 8x32", kAvx512Mr, kAvx512Nr, kernel_avx512},
#endif
};

bool cpu_supports(GemmKernel k) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  switch (k) {
    case GemmKernel::Portable:
      return true;
    case GemmKernel::Avx2Fma:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case GemmKernel::Avx512:
      return __builtin_cpu_supports("avx512f");
    case GemmKernel::Auto:
      break;
  }
  return false;
#else
  return k == GemmKernel::Portable;
#endif
}

GemmKernel best_kernel() {
  if (cpu_supports(GemmKernel::Avx512)) return GemmKernel::Avx512;
  if (cpu_supports(GemmKernel::Avx2Fma)) return GemmKernel::Avx2Fma;
  return GemmKernel::Portable;
}

std::atomic<GemmKernel> g_selected{GemmKernel::Auto};

const KernelInfo& active_kernel() {
  GemmKernel k = g_selected.load(std::memory_order_relaxed);
  if (k == GemmKernel::Auto) {
    k = best_kernel();
    g_selected.store(k, std::memory_order_relaxed);
  }
  for (const KernelInfo& info : kKernels)
    if (info.id == k) return info;
  return kKernels[0];
}

// ---------------------------------------------------------------- blocking
constexpr int kKc = 256;                                      // K block: a B micro-panel of kKc x NR floats stays in L1
constexpr int kMcPanels = 16;                                 // tile height in A panels (MC = 16 * MR)
constexpr int kNcPanels = 8;                                  // tile width in B panels (NC = 8 * NR)
constexpr std::size_t kMaxPackFloats = std::size_t{6} << 20;  // per packed operand chunk (24 MiB)

// A grow-only, 64-byte aligned buffer owned by the calling thread: no allocation in steady state.
struct PackBuffer {
  float* data = nullptr;
  std::size_t capacity = 0;
  PackBuffer() = default;
  PackBuffer(const PackBuffer&) = delete;
  PackBuffer& operator=(const PackBuffer&) = delete;
  ~PackBuffer() { release(); }
  void release() noexcept {
    if (data) ::operator delete[](data, std::align_val_t{64});
    data = nullptr;
    capacity = 0;
  }
  float* get(std::size_t floats) {
    if (floats > capacity) {
      release();
      try {
        data = static_cast<float*>(::operator new[](floats * sizeof(float), std::align_val_t{64}));
      } catch (const std::bad_alloc&) {
        throw Error(ErrorCode::OutOfMemory,
                    "cpu gemm: could not allocate a packing buffer of " + std::to_string(floats) + " floats");
      }
      capacity = floats;
    }
    return data;
  }
};

thread_local PackBuffer t_pack;

// Panel p of A (rows p*mr .. p*mr+mr-1, zero past M): dst[k*mr + r] = A[row r, k].
void pack_a_panel(const float* A, int lda, int rows, int K, int mr, float* dst) {
  for (int k = 0; k < K; ++k) {
    float* d = dst + static_cast<std::ptrdiff_t>(k) * mr;
    for (int r = 0; r < rows; ++r) d[r] = A[static_cast<std::ptrdiff_t>(r) * lda + k];
    for (int r = rows; r < mr; ++r) d[r] = 0.0f;
  }
}

// Panel q of B (columns q*nr .. q*nr+nr-1, zero past N): dst[k*nr + j] = B[k, col j].
void pack_b_panel(const float* B, int ldb, int cols, int K, int nr, float* dst) {
  for (int k = 0; k < K; ++k) {
    float* d = dst + static_cast<std::ptrdiff_t>(k) * nr;
    std::memcpy(d, B + static_cast<std::ptrdiff_t>(k) * ldb, static_cast<std::size_t>(cols) * sizeof(float));
    for (int j = cols; j < nr; ++j) d[j] = 0.0f;
  }
}

// One MR x NR block of C over one K block; edge blocks go through a full-size local tile so the
// kernel's arithmetic is the same as for an interior block.
inline void micro_block(const KernelInfo& kern, int kc, const float* a, const float* b, float* c, int ldc, int rows,
                        int cols, bool load_c) {
  if (rows == kern.mr && cols == kern.nr) {
    kern.fn(kc, a, b, c, ldc, load_c);
    return;
  }
  alignas(64) float tile[kMaxMr * kMaxNr];
  if (load_c) {
    for (int r = 0; r < kern.mr; ++r)
      for (int j = 0; j < kern.nr; ++j)
        tile[r * kern.nr + j] = (r < rows && j < cols) ? c[static_cast<std::ptrdiff_t>(r) * ldc + j] : 0.0f;
  }
  kern.fn(kc, a, b, tile, kern.nr, load_c);
  for (int r = 0; r < rows; ++r)
    for (int j = 0; j < cols; ++j) c[static_cast<std::ptrdiff_t>(r) * ldc + j] = tile[r * kern.nr + j];
}

}  // namespace

bool gemm_select_kernel(GemmKernel kernel) {
  if (kernel == GemmKernel::Auto) {
    g_selected.store(best_kernel(), std::memory_order_relaxed);
    return true;
  }
  if (!cpu_supports(kernel)) return false;
  g_selected.store(kernel, std::memory_order_relaxed);
  return true;
}

const char* gemm_kernel_name() noexcept { return active_kernel().name; }

void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc, bool accumulate,
          ThreadPool* pool) {
  if (M < 0 || N < 0 || K < 0 || lda < std::max(K, 1) || ldb < std::max(N, 1) || ldc < std::max(N, 1))
    throw Error(ErrorCode::InvalidArgument, "cpu gemm: bad sizes M=" + std::to_string(M) + " N=" + std::to_string(N) +
                                                " K=" + std::to_string(K) + " lda=" + std::to_string(lda) +
                                                " ldb=" + std::to_string(ldb) + " ldc=" + std::to_string(ldc));
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int i = 0; i < M; ++i) std::fill_n(C + static_cast<std::ptrdiff_t>(i) * ldc, N, 0.0f);
    return;
  }
  const KernelInfo& kern = active_kernel();
  const int mr = kern.mr, nr = kern.nr;
  const std::size_t a_panel_floats = static_cast<std::size_t>(K) * static_cast<std::size_t>(mr);
  const std::size_t b_panel_floats = static_cast<std::size_t>(K) * static_cast<std::size_t>(nr);

  // Chunks of whole tiles bound the packing memory for very large M or N.
  const int mc = kMcPanels * mr, nc = kNcPanels * nr;
  const int m_chunk_tiles = static_cast<int>(std::max<std::size_t>(1, kMaxPackFloats / (a_panel_floats * kMcPanels)));
  const int n_chunk_tiles = static_cast<int>(std::max<std::size_t>(1, kMaxPackFloats / (b_panel_floats * kNcPanels)));
  const int m_chunk = static_cast<int>(std::min<long long>(M, static_cast<long long>(m_chunk_tiles) * mc));
  const int n_chunk = static_cast<int>(std::min<long long>(N, static_cast<long long>(n_chunk_tiles) * nc));
  const int max_a_panels = (m_chunk + mr - 1) / mr, max_b_panels = (n_chunk + nr - 1) / nr;

  float* const buffer = t_pack.get(a_panel_floats * static_cast<std::size_t>(max_a_panels) +
                                   b_panel_floats * static_cast<std::size_t>(max_b_panels));
  float* const a_pack = buffer;
  float* const b_pack = buffer + a_panel_floats * static_cast<std::size_t>(max_a_panels);

  for (int m0 = 0; m0 < M; m0 += m_chunk) {
    const int m_len = std::min(m_chunk, M - m0);
    const int a_panels = (m_len + mr - 1) / mr;
    for (int n0 = 0; n0 < N; n0 += n_chunk) {
      const int n_len = std::min(n_chunk, N - n0);
      const int b_panels = (n_len + nr - 1) / nr;
      // Pack: A only on the first N chunk of each M chunk.
      const int pack_a_count = n0 == 0 ? a_panels : 0;
      parallel_for(pool, pack_a_count + b_panels, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          if (t < pack_a_count) {
            const int p = static_cast<int>(t);
            const int row0 = m0 + p * mr;
            pack_a_panel(A + static_cast<std::ptrdiff_t>(row0) * lda, lda, std::min(mr, M - row0), K, mr,
                         a_pack + a_panel_floats * static_cast<std::size_t>(p));
          } else {
            const int q = static_cast<int>(t - pack_a_count);
            const int col0 = n0 + q * nr;
            pack_b_panel(B + col0, ldb, std::min(nr, N - col0), K, nr,
                         b_pack + b_panel_floats * static_cast<std::size_t>(q));
          }
        }
      });
      // Compute tiles of (mc_panels x nc_panels) panels; smaller tiles when there would be too few
      // to keep every thread busy (the tiling never changes the arithmetic).
      int mc_panels = kMcPanels, nc_panels = kNcPanels;
      const int want_tiles = pool ? 2 * pool->size() : 1;
      auto tiles = [&](int mp, int np) { return ((a_panels + mp - 1) / mp) * ((b_panels + np - 1) / np); };
      while (nc_panels > 1 && tiles(mc_panels, nc_panels) < want_tiles) nc_panels = (nc_panels + 1) / 2;
      while (mc_panels > 1 && tiles(mc_panels, nc_panels) < want_tiles) mc_panels = (mc_panels + 1) / 2;
      const int tiles_m = (a_panels + mc_panels - 1) / mc_panels;
      const int tiles_n = (b_panels + nc_panels - 1) / nc_panels;
      parallel_for(pool, static_cast<std::int64_t>(tiles_m) * tiles_n, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t t = begin; t < end; ++t) {
          const int tm = static_cast<int>(t / tiles_n), tn = static_cast<int>(t % tiles_n);
          const int p0 = tm * mc_panels, p1 = std::min(a_panels, p0 + mc_panels);
          const int q0 = tn * nc_panels, q1 = std::min(b_panels, q0 + nc_panels);
          for (int k0 = 0; k0 < K; k0 += kKc) {
            const int kc = std::min(kKc, K - k0);
            const bool load_c = accumulate || k0 > 0;
            for (int q = q0; q < q1; ++q) {
              const int col = q * nr;  // within the chunk
              const int cols = std::min(nr, n_len - col);
              const float* bp =
                  b_pack + b_panel_floats * static_cast<std::size_t>(q) + static_cast<std::size_t>(k0) * nr;
              for (int p = p0; p < p1; ++p) {
                const int row = p * mr;
                const int rows = std::min(mr, m_len - row);
                const float* ap =
                    a_pack + a_panel_floats * static_cast<std::size_t>(p) + static_cast<std::size_t>(k0) * mr;
                float* c = C + static_cast<std::ptrdiff_t>(m0 + row) * ldc + (n0 + col);
                micro_block(kern, kc, ap, bp, c, ldc, rows, cols, load_c);
              }
            }
          }
        }
      });
    }
  }
}

}  // namespace ddim::cpu
