// Spatial self-attention (diffusers' Attention / the DDPM AttnBlock), NCHW, every matrix product
// on the deterministic gemm (fp32, or bf16 operands with fp32 accumulation).
//
// With x (n, c, hw) the channel-major tokens of the batch:
//   qkv (n, 3d, hw) = [Wq; Wk; Wv] (3d, c) . x + [bq; bk; bv]     one gemm over the batch
//   per sample and head h (rows h*hd .. of the feature-major qT, kT, vT), k_h and vT_h packed
//   once, then per block of up to kQueryBlock queries i0 .. i1 (so the scores take hw x 256
//   floats, never hw x hw: 4 MiB at 4096 tokens, where the full matrix would be 64 MiB):
//     sT (hw_j, i1-i0) = k_h (hw, hd) . qT_h (hd, i0..i1)  (scores transposed: key j, query i;
//                                                       k_h is kT_h read transposed while packing)
//     softmax over j for each query column i: scale, subtract the column max, exp (exp_f32), normalise
//     oT_h (hd, i0..i1) = vT_h (hd, hw_j) . sT (hw_j, i1-i0)
//   y (n, c, hw) = ((Wo (c, d) . oT + bo) + residual) / rescale   one gemm, the rest in its epilogue
// Every score is one chain over the head's dims and every output one chain over all hw keys (the
// GEMM core's rule: nothing depends on N or on the tile), and the softmax of a column is a fixed
// sequential pass over j, so the query blocking, the batch and the thread count change no bit.
// y must not alias residual.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include "cpu/gemm_core.hpp"
#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/vec_math.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {

// Queries per block of the score matrix (a multiple of every kernel's nr).
constexpr int kQueryBlock = 256;

// Column-wise softmax of sT (keys, cols) over the keys j, after multiplying by scale.
void softmax_columns(float* sT, int keys, int cols, float scale, float* col_max, float* col_sum, Isa isa, ThreadPool* pool) {
  const int hw = keys;
  const std::ptrdiff_t ld = cols;
  parallel_for(pool, cols, [&](std::int64_t begin, std::int64_t end) {
   with_isa(isa, [&]() DDIM_INLINE_LAMBDA {
    const int i0 = static_cast<int>(begin), i1 = static_cast<int>(end);
    for (int i = i0; i < i1; ++i) {
      col_max[i] = -std::numeric_limits<float>::infinity();
      col_sum[i] = 0.0f;
    }
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * ld;
      for (int i = i0; i < i1; ++i) {
        const float v = row[i] * scale;
        row[i] = v;
        col_max[i] = std::max(col_max[i], v);
      }
    }
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * ld;
      for (int i = i0; i < i1; ++i) row[i] = row[i] - col_max[i];
      map16(row + i0, row + i0, static_cast<std::size_t>(i1 - i0), [](auto v) DDIM_INLINE_LAMBDA { return exp_f32(v); });
      for (int i = i0; i < i1; ++i) col_sum[i] += row[i];
    }
    for (int i = i0; i < i1; ++i) col_sum[i] = 1.0f / col_sum[i];
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * ld;
      for (int i = i0; i < i1; ++i) row[i] *= col_sum[i];
    }
   });
  });
}

void check(int n, int c, int hw, int d, int heads) {
  if (n < 0 || c <= 0 || hw <= 0 || d <= 0 || heads <= 0 || d % heads != 0)
    throw Error(ErrorCode::InvalidArgument, "cpu attention: bad shape (c=" + std::to_string(c) +
                                                " hw=" + std::to_string(hw) + " d=" + std::to_string(d) +
                                                " heads=" + std::to_string(heads) + ")");
}

}  // namespace

void pack_attention(const AttentionWeights& w, int c, int d, const KernelSpec& spec, PackedAttention& out,
                    ThreadPool* pool) {
  check(1, c, 1, d, 1);
  // [Wq; Wk; Wv] as one (3d, c) matrix, and the biases likewise (zeros where a bias is absent).
  std::vector<float> wqkv(static_cast<std::size_t>(3) * d * c);
  const std::size_t block = static_cast<std::size_t>(d) * c;
  std::copy_n(w.wq, block, wqkv.begin());
  std::copy_n(w.wk, block, wqkv.begin() + static_cast<std::ptrdiff_t>(block));
  std::copy_n(w.wv, block, wqkv.begin() + static_cast<std::ptrdiff_t>(2 * block));
  pack_a(wqkv.data(), 3 * d, c, c, 1, spec, out.qkv, pool);
  out.qkv_bias.clear();
  if (w.bq || w.bk || w.bv) {
    out.qkv_bias.assign(static_cast<std::size_t>(3) * d, 0.0f);
    const float* biases[3] = {w.bq, w.bk, w.bv};
    for (int i = 0; i < 3; ++i)
      if (biases[i]) std::copy_n(biases[i], d, out.qkv_bias.begin() + static_cast<std::ptrdiff_t>(i) * d);
  }
  pack_a(w.wo, c, d, d, 1, spec, out.out, pool);
  out.bo = w.bo;
  out.spec = &spec;
}

std::size_t attention_scratch_floats(int n, int c, int hw, int d, ThreadPool* /*pool*/) {
  check(n, c, hw, d, 1);
  const std::size_t block = static_cast<std::size_t>(std::min(hw, kQueryBlock));
  return static_cast<std::size_t>(n) * 4 * d * hw + static_cast<std::size_t>(hw) * block + 2 * block;
}

void attention_packed(const float* x_normed, const float* residual, int n, int c, int hw, int d, int heads, float scale,
                      const PackedAttention& w, float rescale, float* y, float* scratch, ThreadPool* pool) {
  check(n, c, hw, d, heads);
  if (!scratch) throw Error(ErrorCode::InvalidArgument, "cpu attention: scratch is required");
  if (residual && residual == y) throw Error(ErrorCode::InvalidArgument, "cpu attention: y may not alias the residual");
  if (w.qkv.m != 3 * d || w.qkv.k != c || w.out.m != c || w.out.k != d)
    throw Error(ErrorCode::InvalidArgument, "cpu attention: packed weights do not fit c=" + std::to_string(c) +
                                                " d=" + std::to_string(d));
  if (n == 0) return;
  const int hd = d / heads;
  const std::size_t dhw = static_cast<std::size_t>(d) * hw;
  float* qkv = scratch;                                     // (n, 3d, hw)
  float* o = qkv + static_cast<std::size_t>(n) * 3 * dhw;   // (n, d, hw)
  const int qb = std::min(hw, kQueryBlock);
  float* sT = o + static_cast<std::size_t>(n) * dhw;        // (hw, qb)
  float* col_max = sT + static_cast<std::size_t>(hw) * qb;  // (qb)
  float* col_sum = col_max + qb;                            // (qb)
  const long total = static_cast<long>(n) * hw;
  {
    const MatrixB xb{x_normed, hw, hw, static_cast<std::ptrdiff_t>(c) * hw};
    COut out;
    out.c = qkv;
    out.ldc = hw;
    out.seg = hw;
    out.seg_stride = static_cast<std::ptrdiff_t>(3) * dhw;
    out.bias = w.qkv_bias.empty() ? nullptr : w.qkv_bias.data();
    gemm_packed(w.qkv, matrix_source(xb, c, static_cast<int>(total)), out, pool);
  }
  for (int b = 0; b < n; ++b) {
    const float* qT = qkv + static_cast<std::size_t>(b) * 3 * dhw;
    const float* kT = qT + dhw;
    const float* vT = kT + dhw;
    float* ob = o + static_cast<std::size_t>(b) * dhw;
    for (int h = 0; h < heads; ++h) {
      const std::size_t off = static_cast<std::size_t>(h) * hd * hw;
      thread_local PackedA k_h, v_h;
      pack_a(kT + off, hw, hd, 1, hw, *w.spec, k_h, pool);  // (hw, hd): kT_h transposed
      pack_a(vT + off, hd, hw, hw, 1, *w.spec, v_h, pool);  // (hd, hw)
      for (int i0 = 0; i0 < hw; i0 += qb) {
        const int cols = std::min(qb, hw - i0);
        {
          const MatrixB qm{qT + off + i0, hw, cols, 0};
          COut out;
          out.c = sT;
          out.ldc = cols;
          out.seg = cols;
          gemm_packed(k_h, matrix_source(qm, hd, cols), out, pool);
        }
        softmax_columns(sT, hw, cols, scale, col_max, col_sum, w.spec->isa, pool);
        {
          const MatrixB sm{sT, cols, cols, 0};
          COut out;
          out.c = ob + off + i0;
          out.ldc = hw;
          out.seg = cols;
          gemm_packed(v_h, matrix_source(sm, hw, cols), out, pool);
        }
      }
    }
  }
  const MatrixB ob{o, hw, hw, static_cast<std::ptrdiff_t>(dhw)};
  COut out;
  out.c = y;
  out.ldc = hw;
  out.seg = hw;
  out.seg_stride = static_cast<std::ptrdiff_t>(c) * hw;
  out.bias = w.bo;
  out.residual = residual;
  out.divisor = rescale;
  gemm_packed(w.out, matrix_source(ob, d, static_cast<int>(total)), out, pool);
}

void attention(const float* x_normed, const float* residual, int n, int c, int hw, int d, int heads, float scale,
               const AttentionWeights& w, float rescale, float* y, float* scratch, ThreadPool* pool) {
  check(n, c, hw, d, heads);
  thread_local PackedAttention packed;
  pack_attention(w, c, d, selected_fp32_kernel(), packed, pool);
  attention_packed(x_normed, residual, n, c, hw, d, heads, scale, packed, rescale, y, scratch, pool);
}

}  // namespace ddim::cpu
