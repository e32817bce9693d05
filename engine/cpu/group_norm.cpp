// GroupNorm (+ optional SiLU), fp32, NCHW.
//
// Per (sample, group): mean and (biased) variance over the group's C/groups channels x HW values,
// two passes in double, in a fixed order; then y = (x - mean) * rstd * gamma[c] + beta[c] in float
// and, when asked, SiLU y / (1 + exp(-y)). Work is split over (sample, group) pairs only, so a
// sample's result depends neither on the batch nor on the thread count.
#include <cmath>
#include <cstddef>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

void group_norm(const float* x, int n, int c, int hw, int groups, float eps, const float* gamma, const float* beta,
                bool silu_after, float* y, ThreadPool* pool) {
  if (n < 0 || c <= 0 || hw <= 0 || groups <= 0 || c % groups != 0)
    throw Error(ErrorCode::InvalidArgument, "cpu group_norm: bad shape (c=" + std::to_string(c) + " groups=" +
                                                std::to_string(groups) + " hw=" + std::to_string(hw) + ")");
  const int cpg = c / groups;
  const std::size_t group_len = static_cast<std::size_t>(cpg) * static_cast<std::size_t>(hw);
  parallel_for(pool, static_cast<std::int64_t>(n) * groups, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t ng = begin; ng < end; ++ng) {
      const std::size_t offset = static_cast<std::size_t>(ng) * group_len;  // groups are contiguous in NCHW
      const float* xg = x + offset;
      float* yg = y + offset;
      double sum = 0.0;
      for (std::size_t i = 0; i < group_len; ++i) sum += xg[i];
      const double mean = sum / static_cast<double>(group_len);
      double sq = 0.0;
      for (std::size_t i = 0; i < group_len; ++i) {
        const double d = xg[i] - mean;
        sq += d * d;
      }
      const double var = sq / static_cast<double>(group_len);
      const float mean_f = static_cast<float>(mean);
      const float rstd_f = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
      const int c0 = static_cast<int>(ng % groups) * cpg;
      for (int ci = 0; ci < cpg; ++ci) {
        const float g = gamma ? gamma[c0 + ci] : 1.0f;
        const float b = beta ? beta[c0 + ci] : 0.0f;
        const float* xc = xg + static_cast<std::size_t>(ci) * hw;
        float* yc = yg + static_cast<std::size_t>(ci) * hw;
        if (silu_after) {
          for (int i = 0; i < hw; ++i) {
            const float v = (xc[i] - mean_f) * rstd_f * g + b;
            yc[i] = v / (1.0f + std::exp(-v));
          }
        } else {
          for (int i = 0; i < hw; ++i) yc[i] = (xc[i] - mean_f) * rstd_f * g + b;
        }
      }
    }
  });
}

}  // namespace ddim::cpu
