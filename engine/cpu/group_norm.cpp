// GroupNorm (+ optional SiLU), fp32, NCHW.
//
// Per (sample, group): mean and (biased) variance over the group's C/groups channels x HW values,
// two passes in double (eight interleaved partial sums, combined in a fixed tree), then
// y = (x - mean) * rstd * gamma[c] + beta[c] in float and, when asked, SiLU y / (1 + exp(-y)) with
// exp_f32 (engine/cpu/vec_math.hpp: the same bits at every vector width). Work is split over
// (sample, group) pairs only, so a sample's result depends neither on the batch nor on the thread
// count.
#include <cmath>
#include <cstddef>
#include <string>

#include "cpu/ops.hpp"
#include "cpu/thread_pool.hpp"
#include "cpu/vec_math.hpp"
#include "ddim/error.hpp"

namespace ddim::cpu {

namespace {

// Sum of f(x[i]) over i in double, in a fixed order independent of alignment.
template <class F>
DDIM_ALWAYS_INLINE double sum_fixed(const float* x, std::size_t len, F f) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::size_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += f(static_cast<double>(x[i + j]));
  for (int j = 0; i < len; ++i, ++j) s[j] += f(static_cast<double>(x[i]));
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

DDIM_ALWAYS_INLINE void normalize(const float* x, int hw, float mean, float rstd, float g, float b, bool silu_after, float* y) {
  const std::size_t n = static_cast<std::size_t>(hw);
  if (silu_after) {
    map16(x, y, n, [&](auto v) DDIM_INLINE_LAMBDA {
      using V = decltype(v);
      return silu_f32((v - splat<V>(mean)) * splat<V>(rstd) * splat<V>(g) + splat<V>(b));
    });
  } else {
    map16(x, y, n, [&](auto v) DDIM_INLINE_LAMBDA {
      using V = decltype(v);
      return (v - splat<V>(mean)) * splat<V>(rstd) * splat<V>(g) + splat<V>(b);
    });
  }
}

}  // namespace

void group_norm(const float* x, int n, int c, int hw, int groups, float eps, const float* gamma, const float* beta,
                bool silu_after, float* y, ThreadPool* pool) {
  if (n < 0 || c <= 0 || hw <= 0 || groups <= 0 || c % groups != 0)
    throw Error(ErrorCode::InvalidArgument, "cpu group_norm: bad shape (c=" + std::to_string(c) + " groups=" +
                                                std::to_string(groups) + " hw=" + std::to_string(hw) + ")");
  const int cpg = c / groups;
  const std::size_t group_len = static_cast<std::size_t>(cpg) * static_cast<std::size_t>(hw);
  const Isa isa = active_isa();
  parallel_for(pool, static_cast<std::int64_t>(n) * groups, [&](std::int64_t begin, std::int64_t end) {
    with_isa(isa, [&]() DDIM_INLINE_LAMBDA {
      for (std::int64_t ng = begin; ng < end; ++ng) {
        const std::size_t offset = static_cast<std::size_t>(ng) * group_len;  // groups are contiguous in NCHW
        const float* xg = x + offset;
        float* yg = y + offset;
        const double mean = sum_fixed(xg, group_len, [](double v) DDIM_INLINE_LAMBDA { return v; }) /
                            static_cast<double>(group_len);
        const double var =
            sum_fixed(xg, group_len, [mean](double v) DDIM_INLINE_LAMBDA { return (v - mean) * (v - mean); }) /
            static_cast<double>(group_len);
        const float mean_f = static_cast<float>(mean);
        const float rstd_f = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
        const int c0 = static_cast<int>(ng % groups) * cpg;
        for (int ci = 0; ci < cpg; ++ci) {
          const float g = gamma ? gamma[c0 + ci] : 1.0f;
          const float b = beta ? beta[c0 + ci] : 0.0f;
          normalize(xg + static_cast<std::size_t>(ci) * hw, hw, mean_f, rstd_f, g, b, silu_after,
                    yg + static_cast<std::size_t>(ci) * hw);
        }
      }
    });
  });
}

}  // namespace ddim::cpu
