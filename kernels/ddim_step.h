#pragma once
// The per-element DDIM update (Song et al. 2021, eq. 12; diffusers' DDIMScheduler.step), shared
// by the CPU backend, ddim::Scheduler::step and the CUDA kernel.
//
//   x0  = (x - sqrt(1-a_t) eps) / sqrt(a_t)                    epsilon prediction
//       = sqrt(a_t) x - sqrt(1-a_t) v                           v prediction
//       = out                                                   sample prediction
//   eps = out | sqrt(a_t) v + sqrt(1-a_t) x | (x - sqrt(a_t) x0) / sqrt(1-a_t)
//   x0 <- clamp(x0, -r, r) (clip_sample) or clamp(x0, -s, s)/s (dynamic thresholding, s per sample)
//   eps <- (x - sqrt(a_t) x0) / sqrt(1-a_t)                     if use_clipped_model_output
//   x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z
// Coefficients are computed in double on the host and rounded once to float.
#include "kernels/hd.h"

namespace ddim {

enum : int { kPredEpsilon = 0, kPredV = 1, kPredSample = 2 };
enum : int { kClipNone = 0, kClipRange = 1, kClipThreshold = 2 };
// Which update a step applies to the clipped x0 prediction: the DDIM update below or DDPM's
// ancestral step (kernels/ddpm_step.h). Both share the x0 prediction and the clipping.
enum : int { kUpdateDdim = 0, kUpdateDdpm = 1 };

struct DdimStepParams {
  float sqrt_alpha_t = 1.f;            // sqrt(a_t)
  float sqrt_one_minus_alpha_t = 0.f;  // sqrt(1 - a_t)
  float sqrt_alpha_prev = 1.f;         // sqrt(a_prev)
  float dir = 0.f;                     // sqrt(1 - a_prev - sigma^2)
  float sigma = 0.f;
  float clip_range = 1.f;              // for kClipRange
  int prediction = kPredEpsilon;
  int clip = kClipNone;
  int use_clipped_model_output = 0;
  int t = 0;                           // the timestep (for the forward's table row)
  int update = kUpdateDdim;
  // kUpdateDdpm only (sigma is then the posterior standard deviation, 0 at t = 0):
  float coef_x0 = 0.f;                 // sqrt(a_prev) beta_t / (1 - a_t)
  float coef_xt = 0.f;                 // sqrt(alpha_t) (1 - a_prev) / (1 - a_t)
};

// The unclipped x0 prediction.
DDIM_HD float ddim_pred_x0(float x, float out, const DdimStepParams& p) {
  using namespace hd;
  switch (p.prediction) {
    case kPredV: return rn_sub(rn_mul(p.sqrt_alpha_t, x), rn_mul(p.sqrt_one_minus_alpha_t, out));
    case kPredSample: return out;
    default: return rn_div(rn_sub(x, rn_mul(p.sqrt_one_minus_alpha_t, out)), p.sqrt_alpha_t);
  }
}

// The noise prediction from the model output (before any clipping of x0).
DDIM_HD float ddim_pred_eps(float x, float out, float x0, const DdimStepParams& p) {
  using namespace hd;
  switch (p.prediction) {
    case kPredV: return rn_add(rn_mul(p.sqrt_alpha_t, out), rn_mul(p.sqrt_one_minus_alpha_t, x));
    case kPredSample: return rn_div(rn_sub(x, rn_mul(p.sqrt_alpha_t, x0)), p.sqrt_one_minus_alpha_t);
    default: return out;
  }
}

// Clipping of x0: kClipRange clamps to +-clip_range; kClipThreshold clamps to +-s and divides by
// s, where s is the per-sample threshold computed beforehand (ddim::dynamic_threshold).
DDIM_HD float ddim_clip_x0(float x0, const DdimStepParams& p, float threshold) {
  using namespace hd;
  if (p.clip == kClipRange) return clampf(x0, -p.clip_range, p.clip_range);
  if (p.clip == kClipThreshold) return rn_div(clampf(x0, -threshold, threshold), threshold);
  return x0;
}

// One element of the step. x0_clipped = ddim_clip_x0(ddim_pred_x0(x, out)); z: unit normal
// (ignored when sigma == 0).
DDIM_HD float ddim_prev_sample(float x, float out, float x0_clipped, float z, const DdimStepParams& p) {
  using namespace hd;
  float eps = ddim_pred_eps(x, out, ddim_pred_x0(x, out, p), p);
  if (p.use_clipped_model_output)
    eps = rn_div(rn_sub(x, rn_mul(p.sqrt_alpha_t, x0_clipped)), p.sqrt_one_minus_alpha_t);
  float prev = rn_add(rn_mul(p.sqrt_alpha_prev, x0_clipped), rn_mul(p.dir, eps));
  if (p.sigma > 0.f) prev = rn_add(prev, rn_mul(p.sigma, z));
  return prev;
}

}  // namespace ddim
