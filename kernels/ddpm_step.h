#pragma once
// The per-element DDPM ancestral step (Ho et al. 2020; diffusers' DDPMScheduler.step with
// prev_t = t - 1), shared by the CPU backend and the CUDA kernel. The x0 prediction and its
// clipping are DDIM's (kernels/ddim_step.h: ddim_pred_x0, ddim_clip_x0); the step then takes the
// posterior mean and adds noise:
//   a_t = alpha-bar_t, a_prev = alpha-bar_{t-1} (1 at t = 0), alpha_t = a_t / a_prev,
//   beta_t = 1 - alpha_t
//   mean    = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t
//   x_{t-1} = mean + sigma z,  sigma = sqrt(max((1 - a_prev) / (1 - a_t) beta_t, 1e-20))
//                                          (fixed_small) or sqrt(beta_t) (fixed_large), 0 at t = 0.
// Coefficients are computed in double on the host (ddim::make_ddpm_step_params) and rounded once.
#include "kernels/ddim_step.h"

namespace ddim {

// One element of the DDPM step: x0_clipped = ddim_clip_x0(ddim_pred_x0(x, out)); z: unit
// normal (ignored when sigma == 0).
DDIM_HD float ddpm_prev_sample(float x, float x0_clipped, float z, const DdimStepParams& p) {
  using namespace hd;
  float prev = rn_add(rn_mul(p.coef_x0, x0_clipped), rn_mul(p.coef_xt, x));
  if (p.sigma > 0.f) prev = rn_add(prev, rn_mul(p.sigma, z));
  return prev;
}

// The update of a step of either kind (p.update).
DDIM_HD float step_prev_sample(float x, float out, float x0_clipped, float z, const DdimStepParams& p) {
  return p.update == kUpdateDdpm ? ddpm_prev_sample(x, x0_clipped, z, p) : ddim_prev_sample(x, out, x0_clipped, z, p);
}

}  // namespace ddim
