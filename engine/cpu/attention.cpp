// Spatial self-attention (diffusers' Attention / the DDPM AttnBlock), fp32, NCHW, one sample at a
// time, with every matrix product on the deterministic gemm.
//
// Per sample, with x (c, hw) the channel-major tokens:
//   qT, kT, vT (d, hw) = W{q,k,v} (d, c) . x + b      (feature-major: no transposes needed)
//   k (hw, d)          = transpose(kT)
//   per head h (rows h*hd .. of the feature-major matrices):
//     sT (hw_j, hw_i)  = k_h (hw, hd) . qT_h (hd, hw)  (scores transposed: key j, query i)
//     softmax over j for each query column i: scale, subtract the column max, exp, normalise
//     oT_h (hd, hw)    = vT_h (hd, hw_j) . sT (hw_j, hw_i)
//   out (c, hw) = Wo (c, d) . oT + bo;  y = (out + residual) / rescale
// The softmax of a column is a fixed sequential pass over j, so nothing depends on the batch or
// on the thread count. y may alias residual.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {

struct AttentionScratch {
  float *qT, *kT, *vT, *oT, *k, *sT, *out, *col_max, *col_sum;
};

AttentionScratch carve(float* s, int c, int hw, int d) {
  const std::size_t dhw = static_cast<std::size_t>(d) * hw;
  AttentionScratch a{};
  a.qT = s;
  a.kT = a.qT + dhw;
  a.vT = a.kT + dhw;
  a.oT = a.vT + dhw;
  a.k = a.oT + dhw;
  a.sT = a.k + dhw;
  a.out = a.sT + static_cast<std::size_t>(hw) * hw;
  a.col_max = a.out + static_cast<std::size_t>(c) * hw;
  a.col_sum = a.col_max + hw;
  return a;
}

// rows (rows, hw) += bias[row], when there is a bias.
void add_row_bias(float* m, int rows, int hw, const float* bias, ThreadPool* pool) {
  if (!bias) return;
  parallel_for(pool, rows, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      float* p = m + r * hw;
      const float b = bias[r];
      for (int i = 0; i < hw; ++i) p[i] += b;
    }
  });
}

// dst (cols, rows) = transpose(src (rows, cols)), in cache-sized blocks.
void transpose(const float* src, int rows, int cols, float* dst, ThreadPool* pool) {
  constexpr int kBlock = 32;
  const int col_blocks = (cols + kBlock - 1) / kBlock;
  parallel_for(pool, col_blocks, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t cb = begin; cb < end; ++cb) {
      const int c0 = static_cast<int>(cb) * kBlock, c1 = std::min(cols, c0 + kBlock);
      for (int r0 = 0; r0 < rows; r0 += kBlock) {
        const int r1 = std::min(rows, r0 + kBlock);
        for (int ci = c0; ci < c1; ++ci)
          for (int r = r0; r < r1; ++r)
            dst[static_cast<std::ptrdiff_t>(ci) * rows + r] = src[static_cast<std::ptrdiff_t>(r) * cols + ci];
      }
    }
  });
}

// Column-wise softmax of sT (hw_j, hw_i) over j, after multiplying by scale.
void softmax_columns(float* sT, int hw, float scale, float* col_max, float* col_sum, ThreadPool* pool) {
  parallel_for(pool, hw, [&](std::int64_t begin, std::int64_t end) {
    const int i0 = static_cast<int>(begin), i1 = static_cast<int>(end);
    for (int i = i0; i < i1; ++i) {
      col_max[i] = -std::numeric_limits<float>::infinity();
      col_sum[i] = 0.0f;
    }
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * hw;
      for (int i = i0; i < i1; ++i) {
        const float v = row[i] * scale;
        row[i] = v;
        col_max[i] = std::max(col_max[i], v);
      }
    }
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * hw;
      for (int i = i0; i < i1; ++i) {
        const float e = std::exp(row[i] - col_max[i]);
        row[i] = e;
        col_sum[i] += e;
      }
    }
    for (int i = i0; i < i1; ++i) col_sum[i] = 1.0f / col_sum[i];
    for (int j = 0; j < hw; ++j) {
      float* row = sT + static_cast<std::ptrdiff_t>(j) * hw;
      for (int i = i0; i < i1; ++i) row[i] *= col_sum[i];
    }
  });
}

void check(int n, int c, int hw, int d, int heads) {
  if (n < 0 || c <= 0 || hw <= 0 || d <= 0 || heads <= 0 || d % heads != 0)
    throw Error(ErrorCode::InvalidArgument, "cpu attention: bad shape (c=" + std::to_string(c) +
                                                " hw=" + std::to_string(hw) + " d=" + std::to_string(d) +
                                                " heads=" + std::to_string(heads) + ")");
}

}  // namespace

std::size_t attention_scratch_floats(int n, int c, int hw, int d, ThreadPool* /*pool*/) {
  check(n, c, hw, d, 1);
  return 5 * static_cast<std::size_t>(d) * hw + static_cast<std::size_t>(hw) * hw + static_cast<std::size_t>(c) * hw +
         2 * static_cast<std::size_t>(hw);
}

void attention(const float* x_normed, const float* residual, int n, int c, int hw, int d, int heads, float scale,
               const AttentionWeights& w, float rescale, float* y, float* scratch, ThreadPool* pool) {
  check(n, c, hw, d, heads);
  if (!scratch) throw Error(ErrorCode::InvalidArgument, "cpu attention: scratch is required");
  const int hd = d / heads;
  const AttentionScratch s = carve(scratch, c, hw, d);
  const std::size_t sample = static_cast<std::size_t>(c) * hw;
  const std::size_t hd_hw = static_cast<std::size_t>(hd) * hw;

  for (int b = 0; b < n; ++b) {
    const float* x = x_normed + sample * static_cast<std::size_t>(b);
    gemm(d, hw, c, w.wq, c, x, hw, s.qT, hw, false, pool);
    add_row_bias(s.qT, d, hw, w.bq, pool);
    gemm(d, hw, c, w.wk, c, x, hw, s.kT, hw, false, pool);
    add_row_bias(s.kT, d, hw, w.bk, pool);
    gemm(d, hw, c, w.wv, c, x, hw, s.vT, hw, false, pool);
    add_row_bias(s.vT, d, hw, w.bv, pool);
    transpose(s.kT, d, hw, s.k, pool);

    for (int h = 0; h < heads; ++h) {
      gemm(hw, hw, hd, s.k + static_cast<std::ptrdiff_t>(h) * hd, d, s.qT + hd_hw * h, hw, s.sT, hw, false, pool);
      softmax_columns(s.sT, hw, scale, s.col_max, s.col_sum, pool);
      gemm(hd, hw, hw, s.vT + hd_hw * h, hw, s.sT, hw, s.oT + hd_hw * h, hw, false, pool);
    }

    gemm(c, hw, d, w.wo, d, s.oT, hw, s.out, hw, false, pool);
    const float* res = residual ? residual + sample * static_cast<std::size_t>(b) : nullptr;
    float* yb = y + sample * static_cast<std::size_t>(b);
    parallel_for(pool, c, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t ch = begin; ch < end; ++ch) {
        const float bo = w.bo ? w.bo[ch] : 0.0f;
        const float* o = s.out + ch * hw;
        const float* r = res ? res + ch * hw : nullptr;
        float* dst = yb + ch * hw;
        for (int i = 0; i < hw; ++i) {
          float v = w.bo ? o[i] + bo : o[i];
          if (r) v = v + r[i];
          dst[i] = v / rescale;
        }
      }
    });
  }
}

}  // namespace ddim::cpu
