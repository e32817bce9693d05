#include "sampler/step_host.hpp"

#include "ddim/error.hpp"

namespace ddim {

void ddim_step_sample(const DdimStepParams& p, std::span<float> x, std::span<const float> out, std::span<const float> z,
                      std::span<float> x0, double threshold_ratio, double threshold_max) {
  const std::size_t n = x.size();
  if (out.size() != n || x0.size() != n || (p.sigma > 0.f && z.size() != n))
    throw Error(ErrorCode::Internal, "ddim_step_sample: span sizes disagree");
  for (std::size_t i = 0; i < n; ++i) x0[i] = ddim_pred_x0(x[i], out[i], p);
  const float s = p.clip == kClipThreshold ? dynamic_threshold(x0, threshold_ratio, threshold_max) : 1.f;
  for (std::size_t i = 0; i < n; ++i) {
    x0[i] = ddim_clip_x0(x0[i], p, s);
    x[i] = ddim_prev_sample(x[i], out[i], x0[i], p.sigma > 0.f ? z[i] : 0.f, p);
  }
}

}  // namespace ddim
