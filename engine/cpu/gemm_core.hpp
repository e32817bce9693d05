#pragma once
// The CPU backend's GEMM core (internal to engine/cpu): micro-kernels per instruction-set level
// and precision, weights packed once in the kernels' panel layout, and a driver that multiplies
// a packed A (M x K) by any B operand whose column panels a packer can produce (a plain matrix,
// a batch of matrices, an implicit im2col of a convolution's input), writing C through an
// epilogue (bias, a per-sample vector, a residual, a divisor).
//
// Determinism: every output element is one chain over k = 0..K-1 in order, c = fma(a_k, b_k, c)
// (fp32 kernels above portable; portable: c = c + a_k * b_k), or for bf16 operands one vdpbf16ps
// per pair of k (its two products, exact in fp32, added to c in the instruction's fixed order,
// with denormals flushed to zero), started from 0 (or from C when accumulating) and
// stored/reloaded exactly between K blocks; the epilogue then adds bias, vector and residual in
// that order and divides. Nothing depends on M, N, the panel or tile an element falls in, the
// number of samples or the thread count; the fp32 kernels of every level above portable agree
// bitwise.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu/isa.hpp"

namespace ddim::cpu {

class ThreadPool;

enum class GemmPrecision { Fp32, Bf16 };  // bf16: operands rounded to bf16, fp32 accumulation

// One micro-kernel: c[mr x width] (ldc) = (load_c ? c : 0) + a_panel . b_panel over `steps`
// k steps (fp32) or k pairs (bf16). a: steps x mr (k-major; bf16: pairs of k per row),
// b: steps x nr (bf16: pairs), of which the kernel reads the first `width` columns.
using MicroKernel = void (*)(int steps, const void* a, const void* b, float* c, long ldc, bool load_c);

struct KernelSpec {
  const char* name;
  Isa isa;
  GemmPrecision precision;
  int mr, nr;
  MicroKernel full;    // mr x nr
  int narrow_nr;       // 0: none
  MicroKernel narrow;  // mr x narrow_nr, same b layout (stride nr)
  int k_group() const { return precision == GemmPrecision::Bf16 ? 2 : 1; }  // k values per step
  std::size_t elem_bytes() const { return precision == GemmPrecision::Bf16 ? 2 : 4; }
};

// The kernel of `isa` for `precision` (bf16: throws ddim::Error naming the missing feature).
const KernelSpec& kernel_spec(Isa isa, GemmPrecision precision);

// A grow-only, 64-byte aligned byte buffer.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& o) noexcept : data_(o.data_), bytes_(o.bytes_) { o.data_ = nullptr, o.bytes_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  ~AlignedBuffer() { release(); }
  void* get(std::size_t bytes, const char* what);  // at least `bytes`; contents undefined on growth
  void* data() const { return data_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void release() noexcept;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

// An M x K matrix in a kernel's A-panel layout: panel p holds rows p*mr .. p*mr+mr-1 (zero past
// M), k-major over K (bf16: K rounded up to pairs, zero padded).
struct PackedA {
  const KernelSpec* spec = nullptr;
  int m = 0, k = 0;
  int panels = 0;
  std::size_t panel_elems = 0;  // elements (floats or bf16) per panel
  AlignedBuffer storage;
  const void* data() const { return storage.data(); }
};

// Packs A[i][k] = a[i * row_stride + k * col_stride] (row-major: (lda, 1); transposed: (1, lda)).
// Panels in parallel on `pool`.
void pack_a(const float* a, int m, int k, std::ptrdiff_t row_stride, std::ptrdiff_t col_stride, const KernelSpec& spec,
            PackedA& out, ThreadPool* pool);

// The B operand (K x N, fp32 in memory): pack(ctx, k0, kc, col0, cols, dst, nr, panel_stride, isa)
// writes rows k0 .. k0+kc-1, columns col0 .. col0+cols-1 (col0 a multiple of nr) into consecutive
// panels of nr columns: (k, j) relative at dst[(j / nr) * panel_stride + k * nr + j % nr], zero
// for the last panel's columns past cols, with instructions up to `isa` (the kernel's). Called
// concurrently from several threads on disjoint dst.
struct BSource {
  void (*pack)(const void* ctx, int k0, int kc, int col0, int cols, float* dst, int nr, std::size_t panel_stride,
               Isa isa) = nullptr;
  const void* ctx = nullptr;
  int k = 0, n = 0;
  // Optional: the same block straight in the bf16 kernels' layout (per pair of rows, nr columns x
  // (k, k+1); panel_stride in bf16 elements), values rounded to nearest even. Without it a bf16
  // gemm packs fp32 and converts.
  void (*pack_bf16)(const void* ctx, int k0, int kc, int col0, int cols, std::uint16_t* dst, int nr,
                    std::size_t panel_stride) = nullptr;
};
// Pieces of a B block that a packer copies row by row: `len` columns from logical column j on
// (never across a panel boundary), whose row-k element comes from src(k) (the packer's own
// addressing). split_runs cuts [j0, j0 + len) at panel boundaries and appends the pieces, each
// piece's base and b advanced by base_step and b_step per column it starts after j0.
struct PackRun {
  std::size_t dst;    // where row 0 of the piece goes: (j / nr) * panel_stride + j % nr
  int len;
  const float* base;  // packer-specific: the piece's data (a matrix: its first column at row 0)
  int a, b;           // packer-specific (the convolution: input row and column at ky = kx = 0)
};
void split_runs(int j0, int len, const float* base, int base_step, int a, int b, int b_step, int nr,
                std::size_t panel_stride, std::vector<PackRun>& out);

// A plain row-major matrix B (K x N, ldb), or `segments` such matrices side by side (segment s at
// b + s * seg_stride, each K x seg with row stride ldb): column j of the whole is column j % seg
// of segment j / seg. (The batch of a 1x1 convolution: seg = H*W, seg_stride = C*H*W.)
struct MatrixB {
  const float* b;
  long ldb;
  int seg;                   // columns per segment
  std::ptrdiff_t seg_stride;
};
BSource matrix_source(const MatrixB& m, int k, int n);

// Where C goes and what is added to it. Column j lives in segment s = j / seg at
// c + s * seg_stride + row * ldc + j % seg (one sample of an NCHW output when seg = H*W).
// After the full K chain: y = (((acc + bias[row]) + vec[s * vec_stride + row]) + residual) / divisor,
// each term only when present (residual uses C's addressing; it may alias c).
struct COut {
  float* c = nullptr;
  long ldc = 0;
  int seg = 0;
  std::ptrdiff_t seg_stride = 0;
  bool accumulate = false;        // C += A.B (no epilogue terms allowed then)
  const float* bias = nullptr;    // (M)
  const float* vec = nullptr;     // (segments, vec_stride): a per-sample per-row addend
  long vec_stride = 0;
  const float* residual = nullptr;
  float divisor = 1.0f;
};

// C (M x N) = A . B with the epilogue; tiles in parallel on `pool`.
void gemm_packed(const PackedA& a, const BSource& b, const COut& out, ThreadPool* pool);

// C (M x N, ldc) (+)= A . B with A[i][k] = a[i * a_row_stride + k * a_col_stride], packed per call
// into a buffer of the calling thread, and B row-major (K x N, ldb).
void gemm_general(int M, int N, int K, const float* a, std::ptrdiff_t a_row_stride, std::ptrdiff_t a_col_stride,
                  const float* b, long ldb, float* c, long ldc, bool accumulate, const KernelSpec& spec, ThreadPool* pool);

// The kernel spec of the process-wide fp32 selection (gemm_select_kernel; Auto: active_isa()).
const KernelSpec& selected_fp32_kernel();

}  // namespace ddim::cpu
